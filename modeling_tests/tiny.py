"""Tiny, offline building blocks for the tests: configs, tokenizers and synthetic images.

Nothing here downloads. Every dropout rate is 0 *in the config* (attention dropout is applied functionally from
a rate stored at init, so zeroing modules afterwards would not be enough for exact training-mode comparisons).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    AutoConfig,
    BertTokenizerFast,
    BlipImageProcessor,
    PreTrainedTokenizerFast,
)

IMAGE_SIZE = 28
NUM_QUERY_TOKENS = 4
LLM_KINDS = ("llama", "t5", "opt")

CORPUS = [
    "what is in the picture ? a red circle on a white background .",
    "describe the image briefly . a blue square and a green triangle .",
    "how many shapes are there ? there are two shapes .",
    "what colour is the circle ? the circle is red .",
    "question : what shape is shown ? answer : a square .",
    "a short caption of the photo : two yellow stars in the sky .",
    "is this a cat or a dog ? it is a small dog sitting on grass .",
]


def vision_config(**overrides) -> dict:
    cfg = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
               image_size=IMAGE_SIZE, patch_size=14, initializer_range=0.02, attention_dropout=0.0)
    return {**cfg, **overrides}


def qformer_config(vocab_size: int = 64, **overrides) -> dict:
    cfg = dict(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
               intermediate_size=37, max_position_embeddings=128, cross_attention_frequency=2,
               hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return {**cfg, **overrides}


def text_config(kind: str, vocab_size: int = 320, **overrides):
    """A tiny LLM config: `llama` and `opt` (decoder-only) or `t5` (encoder-decoder); no dropout."""
    common = dict(vocab_size=vocab_size, pad_token_id=0, eos_token_id=2)
    if kind == "llama":
        cfg = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, bos_token_id=1, attention_dropout=0.0, max_position_embeddings=256)
    elif kind == "opt":
        cfg = dict(hidden_size=32, ffn_dim=37, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=32,
                   bos_token_id=1, dropout=0.0, attention_dropout=0.0, max_position_embeddings=256)
    elif kind == "t5":
        cfg = dict(d_model=32, d_kv=8, d_ff=37, num_layers=2, num_decoder_layers=2, num_heads=4,
                   dropout_rate=0.0, decoder_start_token_id=0, feed_forward_proj="gated-gelu",
                   tie_word_embeddings=False)
    else:
        raise ValueError(kind)
    return AutoConfig.for_model(kind, **{**common, **cfg, **overrides})


def config_kwargs(kind: str, image_token_index: int = 319, **overrides) -> dict:
    """Keyword arguments for an InstructBlipConfig (ours or transformers') with a tiny `kind` LLM."""
    kwargs = dict(vision_config=vision_config(), qformer_config=qformer_config(),
                  text_config=text_config(kind).to_dict(), num_query_tokens=NUM_QUERY_TOKENS,
                  image_token_index=image_token_index)
    return {**kwargs, **overrides}


def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """Overwrite every parameter with N(0, std) noise (LayerNorm weights around 1) so outputs carry signal."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen) * std
            param.copy_(noise + 1.0 if ("norm" in name.lower() and name.endswith("weight")) else noise)
    return model


def images(n: int, size: int = 40, seed: int = 0) -> list[Image.Image]:
    """`n` random RGB PIL images (the processor resizes them)."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def pixel_values(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))


def image_processor():
    """transformers' BLIP image processor at the tiny size (the PIL backend: no torchvision here)."""
    try:
        from transformers import BlipImageProcessorPil as processor_class
    except ImportError:  # older transformers: one BLIP processor
        processor_class = BlipImageProcessor
    return processor_class(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})


def qformer_tokenizer() -> BertTokenizerFast:
    """BERT-style uncased WordPiece tokenizer over the test corpus, truncating from the left like LAVIS."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = sorted({w for line in CORPUS for w in line.split()})
    vocab = {tok: i for i, tok in enumerate(specials + words + ["[DEC]"])}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return BertTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", truncation_side="left",
    )


def llm_tokenizer(kind: str = "llama", vocab_size: int = 300) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on the corpus. ids: 0 pad, 1 bos, 2 eos, 3 unk (T5-style: no bos, eos appended)."""
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = __import__("tokenizers").decoders.ByteLevel()
    tok.train_from_iterator(CORPUS * 4, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if kind == "t5":
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 2)])
        return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", padding_side="left")


def processor(kind: str = "llama", num_query_tokens: int = NUM_QUERY_TOKENS, **kwargs):
    """Our processor over the tiny tokenizers; it adds "<image>" to the LLM tokenizer (id 300)."""
    from hf_instructblip import InstructBlipProcessor

    return InstructBlipProcessor(image_processor(), llm_tokenizer(kind), qformer_tokenizer(),
                                 num_query_tokens=num_query_tokens, **kwargs)
