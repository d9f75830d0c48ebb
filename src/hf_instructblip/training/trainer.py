"""`InstructBlipTrainer`: the stock `Trainer`, fitted to InstructBLIP instruction tuning.

What it changes, and why:
- `remove_unused_columns` is turned off: `InstructBlipDataCollator` reads raw record fields (`image`,
  `instruction`, `answer`) that the model's `forward` does not take, so the default would hand it empty dicts.
- gradient accumulation is exact on both LLM paths: the model normalises its own loss by `num_items_in_batch`,
  which `Trainer` counts over shifted labels only for decoder-only LLMs (the config's `is_encoder_decoder`
  mirrors the LLM's: for T5 every label is a target).
- records named by `dataset` get per-dataset sample counts and loss in the logs.
- PEFT runs also save `instructblip_trainable.safetensors` next to the adapter: the Q-Former is not part of it.
- under FSDP2 and ZeRO-3 the trained weights are gathered from their shards before they are written; resuming under
  FSDP reads the FSDP checkpoint `Trainer` writes (it holds every weight).
"""

from __future__ import annotations

import copy
import os
from collections import defaultdict
from typing import Any

import torch
from accelerate.utils import gather_object
from torch.utils.data import Sampler
from transformers import Trainer
from transformers.utils import (
    ADAPTER_SAFE_WEIGHTS_NAME,
    ADAPTER_WEIGHTS_NAME,
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
)

from ..model.loss import target_labels
from .collator import IGNORE_INDEX, InstructBlipDataCollator
from .freezing import (
    TRAINABLE_WEIGHTS_NAME,
    instructblip_base,
    load_trainable_weights,
    save_trainable_weights,
    trainable_state_dict,
)
from .sampler import SamplerEpochCallback
from .vision_cache import VisionFeatureCache


class InstructBlipTrainer(Trainer):
    """`Trainer` for InstructBLIP instruction tuning (Q-Former only, optionally + PEFT adapters).

    Args (besides `Trainer`'s):
        train_sampler: sampler for the training DataLoader (None: `Trainer`'s random one). It must yield the same
            indices on every process (seed it, avoid global RNG); with `set_epoch`, a `SamplerEpochCallback` is added.
        save_trainable_only: save only the trained weights (`instructblip_trainable.safetensors`) instead of
            the full model; load them with `load_trainable_weights(base_model, checkpoint_dir)`.
        fused_head_loss: training forwards take the loss through the frozen LM head without keeping `[tokens,
            vocab]` logits (less memory, same loss); evaluation forwards keep theirs for `compute_metrics`.
        vision_feature_cache: look batches' `image_ids` up in this cache and hand the model `image_embeds`
            (frozen vision encoder only). Without it, `image_ids` are dropped.

    Example:
        >>> freeze_for_instruction_tuning(model)
        >>> collator = InstructBlipDataCollator(processor, decoder_only=model.config.use_decoder_only_language_model)
        >>> trainer = InstructBlipTrainer(model=model, args=TrainingArguments("out"), train_dataset=records,
        ...                               data_collator=collator)
        >>> trainer.train()
    """

    def __init__(self, *args: Any, train_sampler: Sampler | None = None, save_trainable_only: bool = False,
                 fused_head_loss: bool = True, vision_feature_cache: VisionFeatureCache | None = None,
                 **kwargs: Any) -> None:
        if train_sampler is not None and not isinstance(train_sampler, Sampler):
            raise TypeError(f"`train_sampler` must be a torch.utils.data.Sampler or None, "
                            f"found {type(train_sampler).__name__}.")
        for name, value in (("save_trainable_only", save_trainable_only), ("fused_head_loss", fused_head_loss)):
            if not isinstance(value, bool):
                raise TypeError(f"`{name}` must be a bool, found {type(value).__name__}.")
        if vision_feature_cache is not None and not isinstance(vision_feature_cache, VisionFeatureCache):
            raise TypeError(f"`vision_feature_cache` must be a VisionFeatureCache or None, "
                            f"found {type(vision_feature_cache).__name__}.")
        self.train_sampler = train_sampler
        self.save_trainable_only = save_trainable_only
        self.fused_head_loss = fused_head_loss
        self.vision_feature_cache = vision_feature_cache
        self._dataset_samples: dict[str, int] = defaultdict(int)  # cumulative, per dataset name
        self._dataset_loss: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])  # since last log: sum, tokens
        self._pending_loss: list[tuple[list[str], torch.Tensor, torch.Tensor]] = []  # on device until a log step
        super().__init__(*args, **kwargs)
        self.args = copy.copy(self.args)  # leave the caller's TrainingArguments as they were
        self.args.remove_unused_columns = False  # the collator needs the raw record fields
        self._add_sampler_epoch_callback()
        self._check_fsdp()
        config = instructblip_base(self.model).config
        self._check_collator(config)
        self._shift = config.use_decoder_only_language_model  # decoder-only labels are read shifted by one

    def _add_sampler_epoch_callback(self) -> None:
        """Drive `train_sampler.set_epoch` from `Trainer`'s state (see `SamplerEpochCallback`), unless the caller
        already did."""
        sampler = self.train_sampler
        if not callable(getattr(sampler, "set_epoch", None)):
            return
        callbacks = self.callback_handler.callbacks
        if not any(isinstance(cb, SamplerEpochCallback) and cb.sampler is sampler for cb in callbacks):
            self.add_callback(SamplerEpochCallback(sampler))

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

    def _check_collator(self, config) -> None:
        """Catch a collator built for another LLM kind or image token before the first step does."""
        collator = self.data_collator
        if not isinstance(collator, InstructBlipDataCollator):
            return
        decoder_only = config.use_decoder_only_language_model
        if collator.decoder_only != decoder_only:
            kind = "decoder-only" if decoder_only else "encoder-decoder"
            raise ValueError(f"`data_collator` was built with decoder_only={collator.decoder_only}, but the model's "
                             f"LLM is {kind}; pass decoder_only=model.config.use_decoder_only_language_model.")
        if collator.processor.image_token_id != config.image_token_index:
            raise ValueError(f"`data_collator` places image token id {collator.processor.image_token_id}, but "
                             f"model.config.image_token_index is {config.image_token_index}; they must match.")

    # --- data ---------------------------------------------------------------------------------------------
    def _get_train_sampler(self, *args: Any, **kwargs: Any) -> Sampler | None:
        if self.train_sampler is not None:
            return self.train_sampler
        return super()._get_train_sampler(*args, **kwargs)

    # --- loss + per-dataset statistics ----------------------------------------------------------------
    def compute_loss(
        self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """`Trainer.compute_loss` after removing the `dataset` names, which are recorded for the logs, and looking
        `image_ids` up in the vision feature cache."""
        inputs = self._model_inputs(model, inputs)
        names = inputs.pop("dataset", None)
        if model.training and self.fused_head_loss and "labels" in inputs:
            inputs["fused_head_loss"] = True
        if names is None or not model.training:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        labels = inputs["labels"]
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        self._record(names, outputs.token_losses, labels)
        return (loss, outputs) if return_outputs else loss

    def prediction_step(self, model: torch.nn.Module, inputs: dict[str, Any], *args: Any, **kwargs: Any):
        """`Trainer.prediction_step` without the `dataset` names (the model does not take them)."""
        inputs = {k: v for k, v in self._model_inputs(model, inputs).items() if k != "dataset"}
        return super().prediction_step(model, inputs, *args, **kwargs)

    def _model_inputs(self, model: torch.nn.Module, inputs: dict[str, Any]) -> dict[str, Any]:
        """`image_ids` -> cached `image_embeds` with a cache; dropped without one (the model does not take them)."""
        if self.vision_feature_cache is None:
            return {k: v for k, v in inputs.items() if k != "image_ids"}
        base = instructblip_base(self.accelerator.unwrap_model(model))
        return self.vision_feature_cache.model_inputs(base, inputs)

    def _record(self, names: list[str], token_losses: torch.Tensor, labels: torch.Tensor) -> None:
        """Per-dataset sample counts now; per-row loss sums and token counts `[B]` stay on the device until the
        next log (reading them every step would sync the host, which `Trainer` itself avoids)."""
        counts = (target_labels(labels, self._shift) != IGNORE_INDEX).sum(dim=1)  # [B] labelled tokens
        self._pending_loss.append((names, token_losses.sum(dim=1), counts))
        for name in names:
            self._dataset_samples[name] += 1

    def _dataset_logs(self) -> dict[str, float]:
        """`dataset/<name>/samples` (cumulative, all processes) and `dataset/<name>/loss` (since the last log)."""
        for names, sums, counts in self._pending_loss:
            for name, total, count in zip(names, sums.tolist(), counts.tolist()):
                self._dataset_loss[name][0] += total
                self._dataset_loss[name][1] += count
        self._pending_loss.clear()
        stats = {name: (self._dataset_samples[name], *self._dataset_loss[name]) for name in self._dataset_samples}
        self._dataset_loss.clear()
        per_process = [stats]
        if self.args.world_size > 1:  # every process logs at the same step, so this collective is safe
            per_process = gather_object([stats])
        merged: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0.0])
        for process_stats in per_process:
            for name, values in process_stats.items():
                for i, value in enumerate(values):
                    merged[name][i] += value
        logs = {}
        for name, (samples, loss_sum, tokens) in sorted(merged.items()):
            logs[f"dataset/{name}/samples"] = samples
            if tokens:
                logs[f"dataset/{name}/loss"] = loss_sum / tokens
        return logs

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs and self._dataset_samples:  # training logs only, not eval / end-of-train summaries
            logs = {**logs, **self._dataset_logs()}
        super().log(logs, *args, **kwargs)

    # --- checkpoints --------------------------------------------------------------------------------------
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Full model (or PEFT adapter) as `Trainer` does, or only the trained weights; PEFT runs add those.

        Under FSDP every process must call it (the trained weights are gathered from their shards). With sharded FSDP
        state dicts `Trainer` writes no full weights; `config.json` is added so that `accelerate merge-weights
        CKPT/pytorch_model_fsdp_0 CKPT` turns a checkpoint into a `from_pretrained` folder."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        model = self.accelerator.unwrap_model(self.model)
        peft = instructblip_base(model) is not model  # a PEFT model wraps the InstructBLIP one
        if self._sharded_fsdp_checkpoints() and self.args.should_save:
            instructblip_base(model).config.save_pretrained(output_dir)
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
