"""InstructBLIP as a Hugging Face transformers plugin.

`import hf_instructblip` registers our config and model with `AutoConfig`, `AutoModel` and
`AutoModelForImageTextToText`, so `AutoModel.from_pretrained(path).generate(...)` works.
"""

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText

from .configuration import InstructBlipConfig, InstructBlipQFormerConfig, InstructBlipVisionConfig
from .modeling import InstructBlipForConditionalGeneration
from .qformer import InstructBlipQFormerModel
from .vision_encoder import InstructBlipVisionModel

AutoConfig.register(InstructBlipConfig.model_type, InstructBlipConfig, exist_ok=True)
AutoModel.register(InstructBlipConfig, InstructBlipForConditionalGeneration, exist_ok=True)
AutoModelForImageTextToText.register(InstructBlipConfig, InstructBlipForConditionalGeneration, exist_ok=True)
# Every save / push writes `auto_map` and our code files, so `trust_remote_code=True` works without this package.
InstructBlipConfig.register_for_auto_class()
InstructBlipForConditionalGeneration.register_for_auto_class("AutoModel")
InstructBlipForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")

__all__ = [
    "InstructBlipConfig",
    "InstructBlipForConditionalGeneration",
    "InstructBlipQFormerConfig",
    "InstructBlipQFormerModel",
    "InstructBlipVisionConfig",
    "InstructBlipVisionModel",
]
