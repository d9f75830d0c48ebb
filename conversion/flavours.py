"""The four released InstructBLIP flavours: model configs and LAVIS generation defaults, with no download.

LAVIS builds every flavour from the same EVA ViT-g (39 blocks, width 1408) and BERT-base Q-Former (30523-token
vocabulary: bert-base-uncased + `[DEC]`) with 32 queries; only the LLM differs. The LLM numbers below are those
of `google/flan-t5-{xl,xxl}` and LLaMA/Vicuna v1.1 `{7b,13b}`, written out so a full LAVIS state dict converts
offline. When an LLM folder is given, its own `config.json` is used instead (see `text_config_for`).
"""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, GenerationConfig, PretrainedConfig

from hf_instructblip.templates import generation_preset

FLAVOURS = ("flant5xl", "flant5xxl", "vicuna7b", "vicuna13b")
NUM_QUERY_TOKENS = 32
QFORMER_VOCAB_SIZE = 30523  # bert-base-uncased (30522) + "[DEC]"

# Vicuna: LAVIS adds "[PAD]" (id 32000) to the 32000-token LLaMA vocabulary and uses "</s>" (id 2) as bos,
# eos and unk. We add the image placeholder "<image>" after it (id 32001): 32002 rows in all.
LLAMA_VOCAB_SIZE = 32000
VICUNA_PAD_TOKEN_ID = 32000
VICUNA_IMAGE_TOKEN_ID = 32001
# Flan-T5: the tokenizer has 32100 tokens and the embedding 32128 rows, so "<image>" = 32100 needs no new row.
T5_IMAGE_TOKEN_ID = 32100

_T5_COMMON = dict(
    model_type="t5", vocab_size=32128, d_kv=64, num_layers=24, num_decoder_layers=24,
    feed_forward_proj="gated-gelu", dense_act_fn="gelu",  # LAVIS: exact gelu, not flan-t5's gelu_new
    relative_attention_num_buckets=32, relative_attention_max_distance=128, layer_norm_epsilon=1e-6,
    tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, bos_token_id=1, decoder_start_token_id=0,
    dropout_rate=0.1,
)
_LLAMA_COMMON = dict(
    model_type="llama", vocab_size=VICUNA_IMAGE_TOKEN_ID + 1, hidden_act="silu", max_position_embeddings=2048,
    rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=2, eos_token_id=2, pad_token_id=VICUNA_PAD_TOKEN_ID,
)
TEXT_CONFIGS: dict[str, dict[str, Any]] = {
    "flant5xl": {**_T5_COMMON, "d_model": 2048, "d_ff": 5120, "num_heads": 32},
    "flant5xxl": {**_T5_COMMON, "d_model": 4096, "d_ff": 10240, "num_heads": 64},
    "vicuna7b": {**_LLAMA_COMMON, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                 "num_attention_heads": 32},
    "vicuna13b": {**_LLAMA_COMMON, "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
                  "num_attention_heads": 40},
}


def check_flavour(flavour: str) -> str:
    if flavour not in FLAVOURS:
        raise ValueError(f"`flavour` must be one of {FLAVOURS}, found {flavour!r}.")
    return flavour


def is_vicuna(flavour: str) -> bool:
    return check_flavour(flavour).startswith("vicuna")


def text_config_for(flavour: str, llm_config: PretrainedConfig | None = None) -> PretrainedConfig:
    """The LLM config of `flavour`: the preset, or `llm_config` (an HF LLM's own) with LAVIS's changes applied.

    LAVIS changes to the HF LLM: Flan-T5 uses exact `gelu`; Vicuna gets "[PAD]" and (ours) "<image>" rows and
    uses "</s>" as bos. Example: `text_config_for("vicuna7b").vocab_size == 32002`.
    """
    preset = dict(TEXT_CONFIGS[check_flavour(flavour)])
    if llm_config is None:
        return AutoConfig.for_model(preset.pop("model_type"), **preset)
    if llm_config.model_type != preset["model_type"]:
        raise ValueError(
            f"`llm` for flavour {flavour!r} must be a {preset['model_type']} model, found model_type "
            f"{llm_config.model_type!r}."
        )
    config = llm_config.__class__.from_dict(llm_config.to_dict())
    if is_vicuna(flavour):
        config.vocab_size = VICUNA_IMAGE_TOKEN_ID + 1
        config.bos_token_id, config.eos_token_id, config.pad_token_id = 2, 2, VICUNA_PAD_TOKEN_ID
    else:
        config.dense_act_fn = "gelu"
    return config


def model_config_kwargs(flavour: str, text_config: PretrainedConfig) -> dict[str, Any]:
    """Keyword arguments of `InstructBlipConfig` for `flavour` (vision/Q-Former at their released defaults)."""
    image_token = VICUNA_IMAGE_TOKEN_ID if is_vicuna(flavour) else T5_IMAGE_TOKEN_ID
    return dict(
        vision_config={},  # InstructBlipVisionConfig defaults = EVA ViT-g as LAVIS builds it
        qformer_config={"vocab_size": QFORMER_VOCAB_SIZE},
        text_config=text_config,
        num_query_tokens=NUM_QUERY_TOKENS,
        image_token_index=image_token,
    )


def lavis_generation_config(text_config: PretrainedConfig, image_token_index: int | None) -> GenerationConfig:
    """LAVIS `generate` defaults (`generation_preset("lavis")`): beam search 5, up to 256 new tokens, repetition
    penalty 1.5.

    LAVIS's `top_p=0.9` only acts with nucleus sampling, and transformers refuses to save it next to
    `do_sample=False`: pass `generation_preset("lavis", sample=True)` to `generate` to reproduce LAVIS's
    `use_nucleus_sampling=True`.
    The image placeholder is suppressed: it is never a valid output token (LAVIS has no such token).
    """
    return GenerationConfig(
        **generation_preset("lavis"),
        bos_token_id=getattr(text_config, "bos_token_id", None),
        eos_token_id=getattr(text_config, "eos_token_id", None),
        pad_token_id=getattr(text_config, "pad_token_id", None),
        decoder_start_token_id=getattr(text_config, "decoder_start_token_id", None),
        suppress_tokens=None if image_token_index is None else [image_token_index],
    )
