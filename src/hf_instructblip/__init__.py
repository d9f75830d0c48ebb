"""InstructBLIP as a Hugging Face transformers plugin.

`import hf_instructblip` registers our config, model and processor with `AutoConfig`, `AutoModel`,
`AutoModelForImageTextToText` and `AutoProcessor`, for our folders and official `model_type: instructblip` ones
(opt out: `use_for_official_checkpoints(False)`), so `AutoModel.from_pretrained(path).generate(...)` works.

Only the model, its configuration and processor are imported with the package: training (Trainer, PEFT, samplers),
evaluation and publishing load on first use of one of their names (`hf_instructblip.InstructBlipTrainer`), so
inference pays nothing for them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .auto import register, use_for_official_checkpoints
from .model.configuration import InstructBlipConfig, InstructBlipQFormerConfig, InstructBlipVisionConfig
from .model.configuration_video import InstructBlipVideoConfig
from .model.modeling import InstructBlipForConditionalGeneration, InstructBlipModel
from .model.modeling_video import InstructBlipVideoForConditionalGeneration
from .model.pretrained import InstructBlipPreTrainedModel
from .model.processing import HfInstructBlipProcessor, InstructBlipProcessor, sync_image_token
from .model.processing_video import HfInstructBlipVideoProcessor, InstructBlipVideoProcessor
from .model.qformer import InstructBlipQFormerModel
from .model.vision_encoder import InstructBlipVisionModel

# Public names loaded on first use, by defining module. `TYPE_CHECKING` below lists the same imports for type
# checkers and IDEs (a test keeps the two in step).
_LAZY_MODULES = {
    ".blip2.assembly": ("FromBlip2Result", "from_blip2"),
    ".blip2.provenance": ("Provenance",),
    ".evaluate.generation_metrics": ("generation_metrics",),
    ".evaluate.metrics": ("CiderResult", "cider_d", "exact_match_accuracy", "mean_reciprocal_rank",
                          "normalize_vqa_answer", "roc_auc", "target_rank", "vqa_accuracy", "vqa_example_accuracy"),
    ".evaluate.ranking": ("CandidateRanking", "rank_candidates"),
    ".hub": ("LocalHubApi", "model_card", "push_to_hub", "push_trainable_to_hub", "trainable_card"),
    ".pretraining.collator": ("QFormerPretrainingCollator",),
    ".pretraining.configuration": ("QFormerPretrainingConfig",),
    ".pretraining.modeling": ("QFormerForPretraining", "QFormerPretrainingOutput"),
    ".pretraining.stage2": ("caption_records", "export_blip2", "stage2_model"),
    ".pretraining.trainer": ("QFormerPretrainingTrainer",),
    ".templates": ("eval_prompt", "make_instruction_record", "template_family", "templates_for"),
    ".training.collator": ("InstructBlipDataCollator",),
    ".training.freezing": ("ParameterTable", "freeze_for_instruction_tuning", "load_trainable_weights",
                           "parameter_table", "save_trainable_weights", "trainable_state_dict"),
    ".training.mixture": ("InstructionDataset", "InstructionMixture", "build_instruction_mixture"),
    ".training.sampler": ("BalancedConcatSampler", "SamplerEpochCallback"),
    ".training.sft": ("InstructBlipSFTTrainer",),
    ".training.sources": ("MixtureSource", "most_frequent_answer"),
    ".training.streaming": ("StreamingInstructionMixture", "build_streaming_mixture"),
    ".training.trainer": ("InstructBlipTrainer",),
    ".training.vision_cache": ("VisionFeatureCache",),
}
_LAZY = {name: module for module, names in _LAZY_MODULES.items() for name in names}

if TYPE_CHECKING:
    from .blip2.assembly import FromBlip2Result, from_blip2
    from .blip2.provenance import Provenance
    from .evaluate.generation_metrics import generation_metrics
    from .evaluate.metrics import (CiderResult, cider_d, exact_match_accuracy, mean_reciprocal_rank,
                                   normalize_vqa_answer, roc_auc, target_rank, vqa_accuracy, vqa_example_accuracy)
    from .evaluate.ranking import CandidateRanking, rank_candidates
    from .hub import LocalHubApi, model_card, push_to_hub, push_trainable_to_hub, trainable_card
    from .pretraining.collator import QFormerPretrainingCollator
    from .pretraining.configuration import QFormerPretrainingConfig
    from .pretraining.modeling import QFormerForPretraining, QFormerPretrainingOutput
    from .pretraining.stage2 import caption_records, export_blip2, stage2_model
    from .pretraining.trainer import QFormerPretrainingTrainer
    from .templates import eval_prompt, make_instruction_record, template_family, templates_for
    from .training.collator import InstructBlipDataCollator
    from .training.freezing import (ParameterTable, freeze_for_instruction_tuning, load_trainable_weights,
                                    parameter_table, save_trainable_weights, trainable_state_dict)
    from .training.mixture import InstructionDataset, InstructionMixture, build_instruction_mixture
    from .training.sampler import BalancedConcatSampler, SamplerEpochCallback
    from .training.sft import InstructBlipSFTTrainer
    from .training.sources import MixtureSource, most_frequent_answer
    from .training.streaming import StreamingInstructionMixture, build_streaming_mixture
    from .training.trainer import InstructBlipTrainer
    from .training.vision_cache import VisionFeatureCache

register()

_EAGER = [  # the drop-in names; HfInstructBlip(Video)Processor, the classes' own names, stay importable
    "InstructBlipConfig", "InstructBlipForConditionalGeneration", "InstructBlipModel",
    "InstructBlipPreTrainedModel", "InstructBlipProcessor", "InstructBlipQFormerConfig", "InstructBlipQFormerModel",
    "InstructBlipVideoConfig", "InstructBlipVideoForConditionalGeneration", "InstructBlipVideoProcessor",
    "InstructBlipVisionConfig", "InstructBlipVisionModel", "sync_image_token", "use_for_official_checkpoints",
]
# TRL is optional: `InstructBlipSFTTrainer` loads on use but stays out of `from hf_instructblip import *`.
__all__ = sorted([*_EAGER, *(name for name in _LAZY if name != "InstructBlipSFTTrainer")])


def __getattr__(name: str) -> Any:
    """Import a lazily loaded public name's module on first use, then keep the name here."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
