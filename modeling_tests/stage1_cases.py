"""Tiny stage-1 models and batches shared by the stage-1 tests (parity, DDP, trainer, round trips)."""

from __future__ import annotations

import torch

import tiny
from hf_instructblip.pretraining.configuration import QFormerPretrainingConfig
from hf_instructblip.pretraining.modeling import QFormerForPretraining

CAPTIONS = [line.split(" . ")[-1] if " . " in line else line for line in tiny.CORPUS]
MAX_TXT_LEN = 32  # LAVIS `max_txt_len` of stage 1


def qformer_tokenizer():
    """The tiny BERT tokenizer with `[DEC]` as its bos token (LAVIS `init_tokenizer`)."""
    tok = tiny.qformer_tokenizer()
    tok.add_special_tokens({"bos_token": "[DEC]"})
    return tok


def config(**overrides) -> QFormerPretrainingConfig:
    return QFormerPretrainingConfig(**{**dict(
        vision_config=tiny.vision_config(), qformer_config=tiny.qformer_config(vocab_size=len(qformer_tokenizer())),
        num_query_tokens=tiny.NUM_QUERY_TOKENS, image_text_hidden_size=16), **overrides})


def model(seed: int = 0, **overrides) -> QFormerForPretraining:
    """A random stage-1 model (temperature 0.1), vision encoder frozen (its LayerNorm trains, as LAVIS's)."""
    built = tiny.randomize_(QFormerForPretraining(config(**overrides)), seed=seed)
    with torch.no_grad():
        built.temp.fill_(0.1)
    built.freeze_vision_encoder()
    return built


def text_batch(captions: list[str]) -> dict[str, torch.Tensor]:
    tokens = qformer_tokenizer()(captions, padding="max_length", truncation=True, max_length=MAX_TXT_LEN,
                                 return_tensors="pt")
    return {"input_ids": tokens.input_ids, "attention_mask": tokens.attention_mask}


def batch(n: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    return {"pixel_values": tiny.pixel_values(n, seed=seed), **text_batch(CAPTIONS[:n])}
