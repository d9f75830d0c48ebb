"""InstructBLIP as a Hugging Face transformers plugin.

`import hf_instructblip` registers our config, model and processor with `AutoConfig`, `AutoModel`,
`AutoModelForImageTextToText` and `AutoProcessor`, so `AutoModel.from_pretrained(path).generate(...)` works.
"""

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText

from .evaluate.metrics import (
    CiderResult,
    cider_d,
    exact_match_accuracy,
    mean_reciprocal_rank,
    normalize_vqa_answer,
    roc_auc,
    target_rank,
    vqa_accuracy,
    vqa_example_accuracy,
)
from .evaluate.ranking import CandidateRanking, rank_candidates
from .hub import LocalHubApi, model_card, push_to_hub, push_trainable_to_hub, trainable_card
from .model.configuration import InstructBlipConfig, InstructBlipQFormerConfig, InstructBlipVisionConfig
from .model.modeling import InstructBlipForConditionalGeneration, InstructBlipModel
from .model.processing import HfInstructBlipProcessor, InstructBlipProcessor, sync_image_token
from .model.configuration_video import InstructBlipVideoConfig
from .model.modeling_video import InstructBlipVideoForConditionalGeneration
from .model.processing_video import HfInstructBlipVideoProcessor, InstructBlipVideoProcessor
from .model.pretrained import InstructBlipPreTrainedModel
from .model.qformer import InstructBlipQFormerModel
from .model.vision_encoder import InstructBlipVisionModel
from .templates import eval_prompt, make_instruction_record, template_family, templates_for
from .training.collator import InstructBlipDataCollator
from .training.freezing import (
    ParameterTable,
    freeze_for_instruction_tuning,
    load_trainable_weights,
    parameter_table,
    save_trainable_weights,
    trainable_state_dict,
)
from .training.mixture import (
    InstructionDataset,
    InstructionMixture,
    MixtureSource,
    build_instruction_mixture,
    most_frequent_answer,
)
from .training.sampler import BalancedConcatSampler, SamplerEpochCallback
from .training.streaming import StreamingInstructionMixture, build_streaming_mixture
from .training.trainer import InstructBlipTrainer, generation_metrics
from .training.vision_cache import VisionFeatureCache

AutoConfig.register(InstructBlipConfig.model_type, InstructBlipConfig, exist_ok=True)
AutoModel.register(InstructBlipConfig, InstructBlipForConditionalGeneration, exist_ok=True)
AutoModelForImageTextToText.register(InstructBlipConfig, InstructBlipForConditionalGeneration, exist_ok=True)
# Every save / push writes `auto_map` and our code files, so `trust_remote_code=True` works without this package.
InstructBlipConfig.register_for_auto_class()
InstructBlipForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
# Video: its own `model_type` (hf_instructblip_video), so the Auto classes give the video model for video folders.
AutoConfig.register(InstructBlipVideoConfig.model_type, InstructBlipVideoConfig, exist_ok=True)
AutoModel.register(InstructBlipVideoConfig, InstructBlipVideoForConditionalGeneration, exist_ok=True)
AutoModelForImageTextToText.register(InstructBlipVideoConfig, InstructBlipVideoForConditionalGeneration, exist_ok=True)
InstructBlipVideoConfig.register_for_auto_class()
InstructBlipVideoForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")

__all__ = [
    "BalancedConcatSampler",
    "CandidateRanking",
    "CiderResult",
    "HfInstructBlipProcessor",
    "HfInstructBlipVideoProcessor",
    "InstructBlipConfig",
    "InstructBlipDataCollator",
    "InstructBlipForConditionalGeneration",
    "InstructBlipModel",
    "InstructBlipPreTrainedModel",
    "InstructBlipProcessor",
    "InstructBlipQFormerConfig",
    "InstructBlipQFormerModel",
    "InstructBlipTrainer",
    "InstructBlipVisionConfig",
    "InstructBlipVideoConfig",
    "InstructBlipVideoForConditionalGeneration",
    "InstructBlipVideoProcessor",
    "InstructBlipVisionModel",
    "InstructionDataset",
    "LocalHubApi",
    "InstructionMixture",
    "StreamingInstructionMixture",
    "MixtureSource",
    "ParameterTable",
    "SamplerEpochCallback",
    "VisionFeatureCache",
    "build_instruction_mixture",
    "cider_d",
    "eval_prompt",
    "exact_match_accuracy",
    "freeze_for_instruction_tuning",
    "build_streaming_mixture",
    "most_frequent_answer",
    "generation_metrics",
    "load_trainable_weights",
    "make_instruction_record",
    "mean_reciprocal_rank",
    "model_card",
    "normalize_vqa_answer",
    "parameter_table",
    "push_to_hub",
    "push_trainable_to_hub",
    "rank_candidates",
    "roc_auc",
    "save_trainable_weights",
    "sync_image_token",
    "target_rank",
    "template_family",
    "templates_for",
    "trainable_card",
    "trainable_state_dict",
    "vqa_accuracy",
    "vqa_example_accuracy",
]


def __getattr__(name: str):
    # TRL is optional: `InstructBlipSFTTrainer` imports it on first use (and stays out of `__all__`).
    if name == "InstructBlipSFTTrainer":
        from .training.sft import InstructBlipSFTTrainer

        return InstructBlipSFTTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
