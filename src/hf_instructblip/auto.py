"""What transformers' Auto classes resolve to once `hf_instructblip` is imported.

Our own folders (`model_type: hf_instructblip`, written by our `save_pretrained`) always load as ours. Official
folders (`model_type: instructblip`, e.g. `Salesforce/instructblip-vicuna-7b`) load as ours too, so that
`AutoModel`, `AutoModelForImageTextToText`, `AutoProcessor` and `pipeline("image-text-to-text")` get our placeholder
checks, generation config and T5 padding; `use_for_official_checkpoints(False)` (or the environment variable
`HF_INSTRUCTBLIP_OFFICIAL=0` before the import) gives those folders back to transformers' classes.

Example:
    >>> import hf_instructblip
    >>> AutoModel.from_pretrained("Salesforce/instructblip-flan-t5-xl").generate(**inputs)  # ours
    >>> hf_instructblip.use_for_official_checkpoints(False)  # transformers' InstructBLIP from here on
"""

from __future__ import annotations

import os

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText
from transformers.models.auto import processing_auto
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from .model.configuration import OFFICIAL_MODEL_TYPE, InstructBlipConfig
from .model.configuration_video import InstructBlipVideoConfig
from .model.modeling import InstructBlipForConditionalGeneration
from .model.modeling_video import InstructBlipVideoForConditionalGeneration
from .model.processing import HfInstructBlipProcessor

OFFICIAL_PROCESSOR_NAME = "InstructBlipProcessor"  # `processor_class` in official processor_config.json
_transformers_processor_class_from_name = processing_auto.processor_class_from_name


def _processor_class_from_name(class_name: str):
    """transformers resolves `processor_class` names through its own table first; claim the official name."""
    if class_name == OFFICIAL_PROCESSOR_NAME:
        return HfInstructBlipProcessor
    return _transformers_processor_class_from_name(class_name)


def use_for_official_checkpoints(enabled: bool = True) -> None:
    """Whether official `model_type: instructblip` folders load as our classes through the Auto classes and
    pipelines (the default after `import hf_instructblip`) or as transformers' own (`enabled=False`)."""
    if not isinstance(enabled, bool):
        raise TypeError(f"`enabled` must be a bool, found {type(enabled).__name__}.")
    if enabled:
        # CONFIG_MAPPING, not AutoConfig.register: the latter insists the key equals our own `model_type`.
        CONFIG_MAPPING.register(OFFICIAL_MODEL_TYPE, InstructBlipConfig, exist_ok=True)
        processing_auto.processor_class_from_name = _processor_class_from_name
    else:
        CONFIG_MAPPING._extra_content.pop(OFFICIAL_MODEL_TYPE, None)  # back to transformers' table entry
        processing_auto.processor_class_from_name = _transformers_processor_class_from_name


def register() -> None:
    """Register our configs, models and processors with the Auto classes (called by `import hf_instructblip`)."""
    for config, model in ((InstructBlipConfig, InstructBlipForConditionalGeneration),
                          (InstructBlipVideoConfig, InstructBlipVideoForConditionalGeneration)):
        AutoConfig.register(config.model_type, config, exist_ok=True)
        AutoModel.register(config, model, exist_ok=True)
        AutoModelForImageTextToText.register(config, model, exist_ok=True)
        # Every save / push writes `auto_map` and our code files, so `trust_remote_code=True` works without us.
        config.register_for_auto_class()
        model.register_for_auto_class("AutoModelForImageTextToText")
    use_for_official_checkpoints(os.environ.get("HF_INSTRUCTBLIP_OFFICIAL", "1") != "0")
