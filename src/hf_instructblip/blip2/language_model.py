"""The LLM of a BLIP-2 start: any transformers causal or seq2seq LM (folder, Hub id or built model), checked to be
what `InstructBlipForConditionalGeneration` builds from its config before its weights are read.

Example:
    >>> llm = load_language_model("Qwen/Qwen2.5-7B-Instruct", dtype=torch.bfloat16)
    >>> type(llm).__name__
    'Qwen2ForCausalLM'
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, PretrainedConfig, PreTrainedModel
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
)

ROLE = "language_model"


def llm_auto_class(config: PretrainedConfig) -> type:
    """`AutoModelForCausalLM` or `AutoModelForSeq2SeqLM` for `config` (as our model builds its LLM)."""
    if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return AutoModelForCausalLM
    if config.model_type in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES:
        return AutoModelForSeq2SeqLM
    raise ValueError(f"`{ROLE}`: expected a causal or seq2seq language model (Llama, Mistral, Qwen2, OPT, T5, ...), "
                     f"found model_type {config.model_type!r}.")


def input_embeddings(model: Any) -> torch.nn.Module | None:
    """The model's input embedding module, or None when it has none."""
    try:
        return model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return None


def check_llm_structure(model: Any, what: str) -> None:
    """Input embeddings (the placeholders' rows) and an LM head are required."""
    if input_embeddings(model) is None:
        raise ValueError(f"`{ROLE}`: expected an LLM with input embeddings (the image features replace placeholder "
                         f"rows of them), found {what} without (get_input_embeddings() gives none).")
    head = getattr(model, "get_output_embeddings", lambda: None)()
    if head is None:
        raise ValueError(f"`{ROLE}`: expected an LLM with a language-modelling head (e.g. LlamaForCausalLM, "
                         f"T5ForConditionalGeneration), found {what} without one.")


def load_language_model(source: Any, dtype: torch.dtype | None = None) -> PreTrainedModel:
    """A built LLM (after the checks; cast to `dtype` when given), or one loaded from a folder / Hub id in `dtype`."""
    if isinstance(source, PreTrainedModel):
        check_llm_structure(source, type(source).__name__)
        expected = _built_class(source.config)
        if type(source) is not expected:
            raise ValueError(f"`{ROLE}`: expected the {expected.__name__} that InstructBLIP builds from this config, "
                             f"found {type(source).__name__}.")
        return source if dtype is None else source.to(dtype)  # `dtype` is the LLM's, built or loaded
    if isinstance(source, torch.nn.Module):
        check_llm_structure(source, type(source).__name__)
        raise TypeError(f"`{ROLE}`: expected a transformers PreTrainedModel, found {type(source).__name__}.")
    config = check_language_model(source)
    return llm_auto_class(config).from_pretrained(source, dtype=dtype)


def check_language_model(source: Any) -> PretrainedConfig:
    """The LLM's config, after checking (on the meta device, reading no weights) that it is a usable LLM."""
    if isinstance(source, torch.nn.Module):
        return load_language_model(source).config
    if not isinstance(source, (str, Path)):
        raise TypeError(f"`{ROLE}`: expected an LLM folder, Hub id or model, found {type(source).__name__}.")
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise ValueError(f"`{ROLE}`: expected a folder or Hub id with a config.json, found none at {source!r} "
                         f"({type(err).__name__}).") from None
    with torch.device("meta"):
        check_llm_structure(llm_auto_class(config).from_config(config), f"{config.model_type!r} model")
    return config


def _built_class(config: PretrainedConfig) -> type:
    with torch.device("meta"):
        return type(llm_auto_class(config).from_config(config))
