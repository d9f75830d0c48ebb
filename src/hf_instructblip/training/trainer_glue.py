"""What every InstructBLIP trainer adds to its base (`transformers.Trainer` or TRL's `SFTTrainer`), in one place, so
a fix made for one trainer reaches the other:

- iterable training data gets accelerate's `dispatch_batches=False` unless the user set it (rank 0 cannot
  concatenate batches whose lengths differ); `remove_unused_columns` is off (our collators read raw record fields);
- batch metadata the model does not take (`dataset` names, `image_ids`) is removed, and `image_ids` are looked up in
  a `VisionFeatureCache` when one is given;
- checkpoints: only the trained weights (`save_trainable_only`), the trained Q-Former next to a PEFT adapter (it is
  not part of the adapter), gathering from FSDP2 / ZeRO-3 shards, resume and best-model loading of those weights.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from typing import Any

import torch
from transformers.utils import (
    ADAPTER_SAFE_WEIGHTS_NAME,
    ADAPTER_WEIGHTS_NAME,
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
)

from .freezing import (
    TRAINABLE_WEIGHTS_NAME,
    instructblip_base,
    load_trainable_weights,
    save_trainable_weights,
    trainable_state_dict,
)
from .vision_cache import VisionFeatureCache

METADATA = ("dataset", "image_ids")  # collator fields for the trainer, not for the model


def undispatched_streams(args: tuple, kwargs: dict[str, Any]) -> tuple:
    """`Trainer`'s positional arguments, with `dispatch_batches=False` in the `TrainingArguments` (a copy) when the
    training data is an iterable dataset and the user left it unset: accelerate's default for iterable data (rank 0
    reads every rank's batch and concatenates them) fails on our batches, whose lengths differ from batch to batch.
    Each rank then keeps its own slice of the stream."""
    names = ("model", "args", "data_collator", "train_dataset")
    given = {**dict(zip(names, args)), **kwargs}
    training_args, data = given.get("args"), given.get("train_dataset")
    config = getattr(training_args, "accelerator_config", None)
    if not isinstance(data, torch.utils.data.IterableDataset) or getattr(config, "dispatch_batches", 0) is not None:
        return args
    training_args = copy.copy(training_args)
    training_args.accelerator_config = dataclasses.replace(config, dispatch_batches=False)
    if "args" in kwargs:
        kwargs["args"] = training_args
        return args
    return (args[0], training_args, *args[2:])


class InstructBlipTrainerGlue:
    """Mixin placed before the trainer base class: `class MyTrainer(InstructBlipTrainerGlue, Trainer)`.

    Args (keyword, besides the base's):
        save_trainable_only: save only the trained weights (`instructblip_trainable.safetensors`) instead of the full
            model; load them with `load_trainable_weights(base_model, checkpoint_dir)`.
        vision_feature_cache: look batches' `image_ids` up in this cache and hand the model `image_embeds` (frozen
            vision encoder only). Without it, `image_ids` are dropped.

    Example:
        >>> class InstructBlipTrainer(InstructBlipTrainerGlue, Trainer): ...
        >>> InstructBlipTrainer(model=model, args=args, train_dataset=stream, save_trainable_only=True).train()
    """

    def __init__(self, *args: Any, save_trainable_only: bool = False,
                 vision_feature_cache: VisionFeatureCache | None = None, **kwargs: Any) -> None:
        if not isinstance(save_trainable_only, bool):
            raise TypeError(f"`save_trainable_only` must be a bool, found {type(save_trainable_only).__name__}.")
        if vision_feature_cache is not None and not isinstance(vision_feature_cache, VisionFeatureCache):
            raise TypeError(f"`vision_feature_cache` must be a VisionFeatureCache or None, "
                            f"found {type(vision_feature_cache).__name__}.")
        self.save_trainable_only = save_trainable_only
        self.vision_feature_cache = vision_feature_cache
        super().__init__(*undispatched_streams(args, kwargs), **kwargs)
        self.args = copy.copy(self.args)  # leave the caller's TrainingArguments as they were
        self.args.remove_unused_columns = False  # our collators read raw record fields the models do not take
        self._check_fsdp()

    def _check_fsdp(self) -> None:
        """Refuse what FSDP cannot run: the vision cache calls the vision encoder outside the sharded model's forward
        (its embeddings would still be shards), and FSDP1 keeps trained weights as flat shards we do not gather."""
        if not self.is_fsdp_enabled:
            return
        if self.vision_feature_cache is not None:
            raise ValueError("`vision_feature_cache` cannot be used under FSDP (the vision encoder runs outside the "
                             "sharded forward); leave it out, or train with DDP or DeepSpeed.")
        version = getattr(self.accelerator.state.fsdp_plugin, "fsdp_version", 1)
        if self.save_trainable_only and version != 2:
            raise ValueError(f"`save_trainable_only=True` under FSDP needs FSDP2 (fsdp_config={{'version': 2}}, the "
                             f"default), found FSDP version {version}.")

    def _sharded_fsdp_checkpoints(self) -> bool:
        return self.is_fsdp_enabled and "SHARDED" in str(self.accelerator.state.fsdp_plugin.state_dict_type)

    def model_inputs(self, model: torch.nn.Module, inputs: dict[str, Any], keep: tuple[str, ...] = ()
                     ) -> dict[str, Any]:
        """The batch as the model takes it: metadata removed (except names in `keep`), `image_ids` -> cached
        `image_embeds` with a vision feature cache."""
        if self.vision_feature_cache is not None:  # image_ids + pixel_values -> image_embeds
            base = instructblip_base(self.accelerator.unwrap_model(model))
            inputs = self.vision_feature_cache.model_inputs(base, inputs)
        return {key: value for key, value in inputs.items() if key not in METADATA or key in keep}

    # --- checkpoints --------------------------------------------------------------------------------------
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Full model (or PEFT adapter) as `Trainer` does, or only the trained weights; PEFT runs add those.

        Under FSDP every process must call it (the trained weights are gathered from their shards). With sharded FSDP
        state dicts `Trainer` writes no full weights; `config.json` is added so that `accelerate merge-weights
        CKPT/pytorch_model_fsdp_0 CKPT` turns a checkpoint into a `from_pretrained` folder."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        model = self.accelerator.unwrap_model(self.model)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model  # any model of ours
        peft = base is not model  # a PEFT model wraps ours
        if self._sharded_fsdp_checkpoints() and self.args.should_save:
            base.config.save_pretrained(output_dir)
        if not self.save_trainable_only:
            super().save_model(output_dir, _internal_call=_internal_call)
        elif self.args.should_save:
            os.makedirs(output_dir, exist_ok=True)
            if peft:
                model.save_pretrained(output_dir)  # adapter weights + adapter config only
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
        sharded = self.is_fsdp_enabled or self.is_deepspeed_enabled  # gathering shards is a collective
        if (self.save_trainable_only or peft) and (self.args.should_save or sharded):
            weights = trainable_state_dict(model)  # every process gathers, one writes
            if self.args.should_save:
                save_trainable_weights(model, output_dir, weights)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        """Resume: `Trainer`'s loading for full / adapter weights, then `instructblip_trainable.safetensors`."""
        model = model if model is not None else self.model
        trainable = os.path.join(resume_from_checkpoint, TRAINABLE_WEIGHTS_NAME)
        if not os.path.isfile(trainable) or self.is_fsdp_enabled:  # FSDP checkpoints hold every weight, sharded
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        weight_files = (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME,
                        ADAPTER_SAFE_WEIGHTS_NAME, ADAPTER_WEIGHTS_NAME)
        if any(os.path.isfile(os.path.join(resume_from_checkpoint, name)) for name in weight_files):
            super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_trainable_weights(self.accelerator.unwrap_model(model), trainable)

    def _load_best_model(self) -> None:
        """`Trainer`'s best-model loading, then the best checkpoint's trainable weights (which it does not know)."""
        best = self.state.best_model_checkpoint
        if not best or not os.path.isfile(os.path.join(best, TRAINABLE_WEIGHTS_NAME)):
            return super()._load_best_model()
        self._load_from_checkpoint(best)
