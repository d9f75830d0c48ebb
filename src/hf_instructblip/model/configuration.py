# Copyright 2026 The hf_instructblip authors. Licensed under the BSD 3-Clause License (see pyproject.toml).
"""Configurations: EVA vision encoder, instruction-aware Q-Former, and the composite InstructBLIP config."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from transformers import AutoConfig, PretrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from .validation import check_int

# `model_type` written by transformers' own InstructBLIP; we read its config files as ours.
OFFICIAL_MODEL_TYPE = "instructblip"


def _sub_config(value: Any, name: str, build: Callable[[dict], PretrainedConfig]) -> PretrainedConfig:
    """A sub-config from None (defaults) / dict / config instance; `build` makes one from a dict."""
    if isinstance(value, PretrainedConfig):
        return value
    if value is None or isinstance(value, dict):
        return build(dict(value or {}))
    raise TypeError(f"`{name}` must be None, a dict or a PretrainedConfig, found {type(value).__name__}.")


def _without_model_type(config_class: type, kwargs: dict) -> PretrainedConfig:
    return config_class(**{k: v for k, v in kwargs.items() if k != "model_type"})


def _text_config(kwargs: dict) -> PretrainedConfig:
    """Any causal or seq2seq LM config, by `model_type` (default: OPT, as transformers)."""
    return AutoConfig.for_model(kwargs.pop("model_type", "opt"), **kwargs)


def check_positive_int(config: PretrainedConfig, *names: str) -> None:
    """Each `config.<name>` is an int >= 1 (0 queries would silently ignore the image, a 0 frequency divides by 0)."""
    for name in names:
        check_int(name, getattr(config, name))


def check_heads(config: PretrainedConfig) -> None:
    """Attention splits `hidden_size` evenly over `num_attention_heads`."""
    check_positive_int(config, "hidden_size", "num_attention_heads", "num_hidden_layers")
    if config.hidden_size % config.num_attention_heads:
        raise ValueError(f"{config.base_config_key}: hidden_size ({config.hidden_size}) must be divisible by "
                         f"num_attention_heads ({config.num_attention_heads}).")


class InstructBlipVisionConfig(PretrainedConfig):
    """EVA ViT-g image encoder settings (defaults = the released checkpoints: 39 layers, width 1408).

    Example:
        >>> config = InstructBlipVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
    """

    model_type = "hf_instructblip_vision"
    base_config_key = "vision_config"

    hidden_size: int = 1408
    intermediate_size: int = 6144
    num_hidden_layers: int = 39
    num_attention_heads: int = 16
    image_size: int = 224
    patch_size: int = 14
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    attention_dropout: float = 0.0
    initializer_range: float = 1e-10
    qkv_bias: bool = True

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        check_heads(self)
        check_positive_int(self, "image_size", "patch_size")
        if self.image_size % self.patch_size:
            raise ValueError(f"vision_config: image_size ({self.image_size}) must be a multiple of patch_size "
                             f"({self.patch_size}); otherwise the border pixels are silently dropped.")


class InstructBlipQFormerConfig(PretrainedConfig):
    """Q-Former (BERT-base with cross-attention every `cross_attention_frequency` layers) settings.

    Example:
        >>> config = InstructBlipQFormerConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
    """

    model_type = "hf_instructblip_qformer"
    base_config_key = "qformer_config"

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int | None = 0
    cross_attention_frequency: int = 2
    encoder_hidden_size: int = 1408

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        check_heads(self)
        check_positive_int(self, "cross_attention_frequency", "max_position_embeddings")


class InstructBlipConfig(PretrainedConfig):
    """Composite config: vision encoder + Q-Former + any Hugging Face LLM (`text_config`).

    `instruction_aware=False` gives the paper's ablation (BLIP-2 style: the Q-Former sees only the queries).
    Reads the official `Salesforce/instructblip-*` `config.json` files (`model_type="instructblip"`) as is.

    Example:
        >>> from transformers import LlamaConfig
        >>> config = InstructBlipConfig(
        ...     vision_config={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4},
        ...     qformer_config={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4},
        ...     text_config=LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4),
        ...     num_query_tokens=4, image_token_index=3)
        >>> config.use_decoder_only_language_model
        True
    """

    model_type = "hf_instructblip"
    attribute_map = {"image_token_id": "image_token_index"}
    sub_configs = {
        "vision_config": InstructBlipVisionConfig,
        "qformer_config": InstructBlipQFormerConfig,
        "text_config": AutoConfig,
    }

    vision_config: Any = None
    qformer_config: Any = None
    text_config: Any = None
    num_query_tokens: int = 32
    image_token_index: int | None = None
    instruction_aware: bool = True
    initializer_factor: float = 1.0
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        for name, config_class in (("vision_config", InstructBlipVisionConfig),
                                   ("qformer_config", InstructBlipQFormerConfig)):
            build = partial(_without_model_type, config_class)
            setattr(self, name, _sub_config(getattr(self, name), name, build))
        self.text_config = _sub_config(self.text_config, "text_config", _text_config)
        # Cross-attention keys/values are read from the vision features: their width is the vision width.
        self.qformer_config.encoder_hidden_size = self.vision_config.hidden_size
        kwargs.pop("use_decoder_only_language_model", None)  # derived, see the property
        kwargs.pop("fused_head_loss", None)  # written by 0.1 configs; now a training-time choice (forward / Trainer)
        super().__post_init__(**kwargs)
        check_positive_int(self, "num_query_tokens")
        # Mirrors the LLM, so tools that ask (e.g. `Trainer` counting label tokens for `num_items_in_batch`: every
        # label is a target for T5, while decoder-only labels are shifted) treat a T5-backed model correctly.
        self.is_encoder_decoder = bool(getattr(self.text_config, "is_encoder_decoder", False))

    @property
    def use_decoder_only_language_model(self) -> bool:
        return self.text_config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs):
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        if config_dict.get("model_type") == OFFICIAL_MODEL_TYPE:
            config_dict = {**config_dict, "model_type": cls.model_type}
        return config_dict, kwargs
