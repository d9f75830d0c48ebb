"""Tiny, offline BLIP-2 start sources for the tests: transformers BLIP-2 folders (stage 1 and 2), a LAVIS-layout BLIP-2
state dict written from the LAVIS layout document, a BERT folder and LLM folders, each with its tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, BertConfig, BertForMaskedLM, Blip2Config
from transformers import Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval

import tiny

QFORMER_TEXT_KEYS = ("embeddings.word_embeddings", "embeddings.position_embeddings", ".intermediate.", ".output.")


def blip2_config(kind: str = "opt", stage: int = 2, **text_overrides) -> Blip2Config:
    """A tiny transformers BLIP-2 config (stage 1: the Q-Former text input, no LLM)."""
    qformer = tiny.qformer_config(vocab_size=len(tiny.qformer_tokenizer()), use_qformer_text_input=stage == 1)
    text = tiny.text_config(kind, **text_overrides).to_dict() if stage == 2 else None
    return Blip2Config(vision_config=tiny.vision_config(), qformer_config=qformer, text_config=text,
                       num_query_tokens=tiny.NUM_QUERY_TOKENS, image_text_hidden_size=16)


def blip2_folder(folder: Path, kind: str = "opt", stage: int = 2, seed: int = 0, **text_overrides):
    """A random transformers BLIP-2 saved to `folder` (safetensors); returns the model."""
    model_class = Blip2ForConditionalGeneration if stage == 2 else Blip2ForImageTextRetrieval
    model = tiny.randomize_(model_class(blip2_config(kind, stage, **text_overrides)), seed=seed).eval()
    model.save_pretrained(folder)
    if stage == 1:  # blip2-itm-vit-g ships the Q-Former's BERT tokenizer
        tiny.qformer_tokenizer().save_pretrained(folder)
    return model


def bert_folder(folder: Path, seed: int = 1, **overrides) -> BertForMaskedLM:
    """A random masked-LM BERT of the tiny Q-Former's size (its keys carry the `bert.` prefix), with tokenizer."""
    q = tiny.qformer_config()
    config = BertConfig(**{**dict(vocab_size=len(tiny.qformer_tokenizer()), hidden_size=q["hidden_size"],
                                  num_hidden_layers=q["num_hidden_layers"], num_attention_heads=4,
                                  intermediate_size=q["intermediate_size"], max_position_embeddings=128,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0), **overrides})
    model = tiny.randomize_(BertForMaskedLM(config), seed=seed).eval()
    model.save_pretrained(folder)
    tiny.qformer_tokenizer().save_pretrained(folder)
    return model


def llm_folder(folder: Path, kind: str, seed: int = 2, **overrides):
    """A random tiny LLM of `kind` with its tokenizer."""
    model_class = AutoModelForCausalLM if kind != "t5" else AutoModelForSeq2SeqLM
    model = tiny.randomize_(model_class.from_config(tiny.text_config(kind, **overrides)), seed=seed).eval()
    model.save_pretrained(folder)
    tiny.llm_tokenizer(kind).save_pretrained(folder)
    return model


def lavis_blip2_state_dict(hf_state: dict[str, torch.Tensor], stage: int, llm: str = "opt") -> dict[str, torch.Tensor]:
    """The LAVIS layout (reference/lavis_checkpoint_layout.md; BLIP-2's `blip2_opt.py` / `blip2_qformer.py`) of a
    transformers BLIP-2 state dict, renamed here by hand. EVA's fused qkv bias is split into q_bias / v_bias (its
    key third is not kept: LAVIS has no key bias). Stage 2 carries its LLM under `<llm>_model.`; stage 1 its heads."""
    out: dict[str, torch.Tensor] = {}
    for key, value in hf_state.items():
        new = (key.replace("vision_model.embeddings.class_embedding", "visual_encoder.cls_token")
               .replace("vision_model.embeddings.position_embedding", "visual_encoder.pos_embed")
               .replace("vision_model.embeddings.patch_embedding", "visual_encoder.patch_embed.proj")
               .replace("vision_model.post_layernorm", "ln_vision")
               .replace("vision_model.encoder.layers", "visual_encoder.blocks")
               .replace("layer_norm1", "norm1").replace("layer_norm2", "norm2")
               .replace("self_attn.projection", "attn.proj").replace("self_attn.qkv", "attn.qkv")
               .replace("qformer.layernorm", "Qformer.bert.embeddings.LayerNorm")
               .replace("qformer.encoder", "Qformer.bert.encoder")
               .replace("attention.attention.", "attention.self.")
               .replace("language_projection", f"{llm}_proj")
               .replace("language_model.", f"{llm}_model.")
               .replace("vision_projection", "vision_proj").replace("text_projection", "text_proj"))
        if key.startswith("embeddings."):
            new = "Qformer.bert." + key
        if new.endswith("attn.qkv.bias"):
            width = value.shape[0] // 3
            out[new.replace("qkv.bias", "q_bias")] = value[:width]
            out[new.replace("qkv.bias", "v_bias")] = value[2 * width:]
            continue
        out[new] = value
    out["Qformer.bert.embeddings.position_ids"] = torch.arange(128)[None]
    if stage == 1:
        out["temp"] = torch.tensor(0.07)
        width = hf_state["query_tokens"].shape[-1]
        out["Qformer.cls.predictions.transform.dense.weight"] = torch.zeros(width, width)
    return out
