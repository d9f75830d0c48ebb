"""Instruction tuning: collator, Q-Former-only freezing, balanced mixture sampler, mixture builder, trainer and
the vision feature cache."""

from .collator import InstructBlipDataCollator
from .freezing import (
    ParameterTable,
    freeze_for_instruction_tuning,
    load_trainable_weights,
    parameter_table,
    save_trainable_weights,
    trainable_state_dict,
)
from .mixture import InstructionDataset, InstructionMixture, MixtureSource, build_instruction_mixture
from .sampler import BalancedConcatSampler, SamplerEpochCallback
from .trainer import InstructBlipTrainer
from .vision_cache import VisionFeatureCache
