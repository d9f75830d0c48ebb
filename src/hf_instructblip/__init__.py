"""InstructBLIP as a Hugging Face transformers plugin.

`import hf_instructblip` registers our config, model and processor with `AutoConfig`, `AutoModel`,
`AutoModelForImageTextToText` and `AutoProcessor`, for our folders and official `model_type: instructblip` ones
(opt out: `use_for_official_checkpoints(False)`), so `AutoModel.from_pretrained(path).generate(...)` works.
"""

from .auto import register, use_for_official_checkpoints
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

register()

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
    "use_for_official_checkpoints",
    "vqa_example_accuracy",
]


def __getattr__(name: str):
    # TRL is optional: `InstructBlipSFTTrainer` imports it on first use (and stays out of `__all__`).
    if name == "InstructBlipSFTTrainer":
        from .training.sft import InstructBlipSFTTrainer

        return InstructBlipSFTTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
