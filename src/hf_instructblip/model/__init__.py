"""The model as it ships next to every checkpoint: `save_pretrained` copies these modules beside the weights, so
`trust_remote_code=True` loads them without this package. They import nothing outside this folder."""

from .configuration import InstructBlipConfig, InstructBlipQFormerConfig, InstructBlipVisionConfig
from .modeling import InstructBlipForConditionalGeneration
from .processing import HfInstructBlipProcessor, InstructBlipProcessor, sync_image_token
from .qformer import InstructBlipQFormerModel
from .vision_encoder import InstructBlipVisionModel
