"""Stage-1 settings, read from and written as transformers' BLIP-2 `config.json` (`Blip2ForImageTextRetrieval`)."""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

from ..model.configuration import (
    InstructBlipQFormerConfig,
    InstructBlipVisionConfig,
    check_positive_int,
)
from ..model.validation import check_weight

BLIP2_MODEL_TYPE = "blip-2"  # transformers' BLIP-2 config type: what the saved config.json says
BLIP2_SUB_TYPES = {"vision_config": "blip_2_vision_model", "qformer_config": "blip_2_qformer"}


def _sub(config_class: type, name: str, value: Any) -> PretrainedConfig:
    if isinstance(value, config_class):
        return value
    if isinstance(value, PretrainedConfig):
        value = value.to_dict()
    if value is None or isinstance(value, dict):
        fields = {k: v for k, v in (value or {}).items() if k in config_class.__annotations__}
        return config_class(**fields)
    raise TypeError(f"`{name}` must be None, a dict or a PretrainedConfig, found {type(value).__name__}.")


class QFormerPretrainingConfig(PretrainedConfig):
    """Vision encoder + Q-Former with text input + ITC / ITM heads (+ our ITG head and temperature).

    Reads transformers' BLIP-2 config files (`model_type="blip-2"`, e.g. `Salesforce/blip2-itm-vit-g`) and writes
    one (`use_qformer_text_input=True`), so `Blip2ForImageTextRetrieval.from_pretrained` reads a saved folder.

    Example:
        >>> config = QFormerPretrainingConfig(
        ...     vision_config={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4},
        ...     qformer_config={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4},
        ...     num_query_tokens=4, image_text_hidden_size=16)
        >>> config.to_dict()["model_type"], config.to_dict()["qformer_config"]["use_qformer_text_input"]
        ('blip-2', True)
    """

    model_type = "hf_instructblip_qformer_pretraining"
    sub_configs = {"vision_config": InstructBlipVisionConfig, "qformer_config": InstructBlipQFormerConfig}

    vision_config: Any = None
    qformer_config: Any = None
    num_query_tokens: int = 32
    image_text_hidden_size: int = 256
    temperature: float = 0.07  # LAVIS `Blip2Qformer.temp` at init (a learned parameter)
    initializer_factor: float = 1.0
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        self.vision_config = _sub(InstructBlipVisionConfig, "vision_config", self.vision_config)
        self.qformer_config = _sub(InstructBlipQFormerConfig, "qformer_config", self.qformer_config)
        self.qformer_config.encoder_hidden_size = self.vision_config.hidden_size
        for name in ("text_config", "image_token_index", "use_decoder_only_language_model"):  # stage-2 BLIP-2 fields
            kwargs.pop(name, None)
        super().__post_init__(**kwargs)
        check_positive_int(self, "num_query_tokens", "image_text_hidden_size")
        if check_weight("temperature", self.temperature) == 0:
            raise ValueError("`temperature` must be > 0 (it divides the similarities), found 0.")

    def to_dict(self) -> dict[str, Any]:
        """transformers' BLIP-2 layout: sub-config types of BLIP-2, the Q-Former's text input declared."""
        out = super().to_dict()
        out["model_type"] = BLIP2_MODEL_TYPE
        for name, sub_type in BLIP2_SUB_TYPES.items():
            out[name] = {**out[name], "model_type": sub_type}
        out["qformer_config"]["use_qformer_text_input"] = True
        out["text_config"] = None
        return out

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs):
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        if config_dict.get("model_type") == BLIP2_MODEL_TYPE:
            config_dict = {**config_dict, "model_type": cls.model_type}
        return config_dict, kwargs
