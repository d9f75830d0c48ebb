"""Offline stand-ins for the two Hub tokenizers that transformers' InstructBLIP processor test loads
("hf-internal-testing/tiny-random-GPT2Model", "hf-internal-testing/tiny-random-bert").

The Hub is unreachable here (HF_HUB_OFFLINE=1, empty cache), so without these every processor test errors in
setUpClass, in (A) and (B) alike. We build small tokenizers of the same families locally (byte-level BPE saved as
GPT2TokenizerFast; WordPiece saved as BertTokenizerFast) and lay them out as a Hub cache
(models--<org>--<name>/refs/main + snapshots/<rev>/) under ./hf_cache. Nothing is downloaded. Vocabularies differ
from the real repos, so exact-token assertions could differ from upstream CI; (A) and (B) use the same ones.
"""

import json
import pathlib
import shutil

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import BertConfig, BertTokenizerFast, GPT2Config, GPT2TokenizerFast

ROOT = pathlib.Path(__file__).parent / "hf_cache"
REV = "0" * 40
CORPUS = [
    "lower newer what is in the picture ? describe the image in detail . a cat and a dog on a red sofa",
    "the quick brown fox jumps over the lazy dog . hello world ! this is a test of the processor",
    "question : how many people are there ? answer : two . short answer please . <image> image video audio",
] * 20


def snapshot_dir(repo_id: str) -> pathlib.Path:
    repo = ROOT / ("models--" + repo_id.replace("/", "--"))
    if repo.exists():
        shutil.rmtree(repo)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(REV)
    snap = repo / "snapshots" / REV
    snap.mkdir(parents=True)
    return snap


def gpt2_like():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.train_from_iterator(
        CORPUS,
        trainers.BpeTrainer(vocab_size=1000, special_tokens=["<|endoftext|>"],
                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
    )
    fast = GPT2TokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                             unk_token="<|endoftext|>", model_max_length=1024)
    snap = snapshot_dir("hf-internal-testing/tiny-random-GPT2Model")
    fast.save_pretrained(snap)
    # the real repo has a config.json (AutoTokenizer reads it); a tiny config, no weights
    GPT2Config(vocab_size=len(fast), n_positions=512, n_embd=32, n_layer=2, n_head=4,
               bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id).save_pretrained(snap)


def bert_like():
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(CORPUS, trainers.WordPieceTrainer(vocab_size=1000, special_tokens=specials))
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    tok.decoder = decoders.WordPiece()
    fast = BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                             sep_token="[SEP]", mask_token="[MASK]", model_max_length=512)
    snap = snapshot_dir("hf-internal-testing/tiny-random-bert")
    fast.save_pretrained(snap)
    BertConfig(vocab_size=len(fast), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=37, pad_token_id=fast.pad_token_id).save_pretrained(snap)


if __name__ == "__main__":
    gpt2_like()
    bert_like()
    for p in sorted(ROOT.rglob("*")):
        if p.is_file():
            print(p.relative_to(ROOT), p.stat().st_size)
