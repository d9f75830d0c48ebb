"""`InstructBlipTrainer`: the stock `Trainer`, fitted to InstructBLIP instruction tuning.

What it changes, and why (besides `InstructBlipTrainerGlue`, shared with the TRL trainer):
- gradient accumulation is exact on both LLM paths: the model normalises its own loss by `num_items_in_batch`.
- records named by `dataset` get per-dataset sample counts and loss in the logs.
- evaluation with generation (`Seq2SeqTrainingArguments(predict_with_generate=True)`): evaluation batches hold the
  prompt alone, `compute_metrics` gets the new tokens only, and the evaluation loss is still taken on the training
  layout (`evaluate.generation_metrics` builds a `compute_metrics`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import torch
from accelerate.utils import gather_object
from torch.utils.data import DataLoader, Dataset, Sampler
from transformers import GenerationConfig, Seq2SeqTrainer, Trainer
from transformers.distributed.fsdp import is_fsdp_managed_module
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from transformers.trainer_utils import PredictionOutput

from ..model.layout import IGNORE_INDEX, new_tokens
from ..model.loss import target_labels
from .collator import InstructBlipDataCollator
from .freezing import instructblip_base
from .sampler import SamplerEpochCallback
from .trainer_glue import InstructBlipTrainerGlue


class InstructBlipTrainer(InstructBlipTrainerGlue, Trainer):
    """`Trainer` for InstructBLIP instruction tuning (Q-Former only, optionally + PEFT adapters).

    Args (besides `Trainer`'s):
        train_sampler: sampler for the training DataLoader (None: `Trainer`'s random one). It must yield the same
            indices on every process (seed it, avoid global RNG); with `set_epoch`, a `SamplerEpochCallback` is added.
        save_trainable_only, vision_feature_cache: see `InstructBlipTrainerGlue`.
        fused_head_loss: training forwards take the loss through the frozen LM head without keeping `[tokens,
            vocab]` logits (less memory, same loss); evaluation forwards keep theirs for `compute_metrics`.
        eval_data_collator: collator of `evaluate` / `predict` batches (None: `data_collator`; with
            `predict_with_generate`, an `InstructBlipDataCollator` given as `data_collator` is copied with
            `prompt_only=True`). With `predict_with_generate` an `InstructBlipDataCollator` here must be prompt-only.

    With `Seq2SeqTrainingArguments(predict_with_generate=True)`, evaluation and prediction generate: predictions are
    the generated token ids `[N, new tokens]` (no prompt echo; -100 pads batches to one width), `label_ids` the
    reference `[answer][eos]` ids; `generation_config`, `generation_max_length` and `generation_num_beams` of the
    arguments and keyword arguments of `evaluate` / `predict` go to `generate`, as with `Seq2SeqTrainer` (which
    does not run this model: it pads predictions from a top-level `pad_token_id` and keeps the prompt echo).

    Example:
        >>> freeze_for_instruction_tuning(model)
        >>> collator = InstructBlipDataCollator(processor, decoder_only=model.config.use_decoder_only_language_model)
        >>> trainer = InstructBlipTrainer(model=model, args=TrainingArguments("out"), train_dataset=records,
        ...                               data_collator=collator)
        >>> trainer.train()
        >>> args = Seq2SeqTrainingArguments("out", predict_with_generate=True, eval_strategy="steps", eval_steps=500,
        ...                                 generation_config=GenerationConfig(max_new_tokens=10, num_beams=5))
        >>> trainer = InstructBlipTrainer(model=model, args=args, train_dataset=records, eval_dataset=eval_records,
        ...                               data_collator=collator, compute_metrics=generation_metrics(processor))
        >>> trainer.train()  # logs eval_loss and eval_exact_match every 500 steps
    """

    def __init__(self, *args: Any, train_sampler: Sampler | None = None, fused_head_loss: bool = True,
                 eval_data_collator: Callable | None = None, **kwargs: Any) -> None:
        if train_sampler is not None and not isinstance(train_sampler, Sampler):
            raise TypeError(f"`train_sampler` must be a torch.utils.data.Sampler or None, "
                            f"found {type(train_sampler).__name__}.")
        if not isinstance(fused_head_loss, bool):
            raise TypeError(f"`fused_head_loss` must be a bool, found {type(fused_head_loss).__name__}.")
        if eval_data_collator is not None and not callable(eval_data_collator):
            raise TypeError(f"`eval_data_collator` must be a callable (records -> batch) or None, "
                            f"found {type(eval_data_collator).__name__}.")
        self.train_sampler = train_sampler
        self.fused_head_loss = fused_head_loss
        self._dataset_samples: dict[str, int] = defaultdict(int)  # cumulative, per dataset name
        self._dataset_loss: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])  # since last log: sum, tokens
        self._pending_loss: list[tuple[list[str], torch.Tensor, torch.Tensor]] = []  # on device until a log step
        super().__init__(*args, **kwargs)  # InstructBlipTrainerGlue: save_trainable_only, vision_feature_cache
        self._add_sampler_epoch_callback()
        self.eval_data_collator = self._evaluation_collator(eval_data_collator)
        config = instructblip_base(self.model).config
        self._check_collator(config)
        self._shift = config.use_decoder_only_language_model  # decoder-only labels are read shifted by one
        generation_config = getattr(self.args, "generation_config", None)  # Seq2SeqTrainingArguments only
        self._generation_config: GenerationConfig | None = (
            None if generation_config is None else Seq2SeqTrainer.load_generation_config(generation_config))
        self._gen_kwargs: dict[str, Any] = {}  # of the running evaluate / predict call

    @property
    def _predict_with_generate(self) -> bool:
        return bool(getattr(self.args, "predict_with_generate", False))  # Seq2SeqTrainingArguments only

    def _evaluation_collator(self, collator: Callable | None) -> Callable:
        """The collator of evaluation / prediction batches; generation needs prompt-only batches."""
        wrong = isinstance(collator, InstructBlipDataCollator) and not collator.prompt_only
        if self._predict_with_generate and wrong:
            raise ValueError("`eval_data_collator` lays out training sequences (prompt + answer), so `generate` would "
                             "continue after the answer; with predict_with_generate=True pass one built with "
                             "prompt_only=True, or leave it None to derive it from `data_collator`.")
        if collator is not None:
            return collator
        training = self.data_collator
        if self._predict_with_generate and isinstance(training, InstructBlipDataCollator) and not training.prompt_only:
            return dataclasses.replace(training, prompt_only=True, train_on_prompt=False)
        return training

    def _add_sampler_epoch_callback(self) -> None:
        """Drive `train_sampler.set_epoch` from `Trainer`'s state (see `SamplerEpochCallback`), unless the caller
        already did."""
        sampler = self.train_sampler
        if not callable(getattr(sampler, "set_epoch", None)):
            return
        callbacks = self.callback_handler.callbacks
        if not any(isinstance(cb, SamplerEpochCallback) and cb.sampler is sampler for cb in callbacks):
            self.add_callback(SamplerEpochCallback(sampler))

    def _check_collator(self, config) -> None:
        """Catch a collator built for another LLM kind or image token before the first step does."""
        for name, collator in (("data_collator", self.data_collator), ("eval_data_collator", self.eval_data_collator)):
            if isinstance(collator, InstructBlipDataCollator):
                collator.check_model(config, name)

    # --- data ---------------------------------------------------------------------------------------------
    def _get_train_sampler(self, *args: Any, **kwargs: Any) -> Sampler | None:
        if self.train_sampler is not None:
            return self.train_sampler
        return super()._get_train_sampler(*args, **kwargs)

    @contextlib.contextmanager
    def _collating_with(self, collator: Callable) -> Iterator[None]:
        """`Trainer` builds every DataLoader from `self.data_collator`; evaluation ones take `eval_data_collator`."""
        training, self.data_collator = self.data_collator, collator
        try:
            yield
        finally:
            self.data_collator = training

    def get_eval_dataloader(self, eval_dataset: str | Dataset | None = None) -> DataLoader:
        with self._collating_with(self.eval_data_collator):
            return super().get_eval_dataloader(eval_dataset)

    def get_test_dataloader(self, test_dataset: Dataset) -> DataLoader:
        with self._collating_with(self.eval_data_collator):
            return super().get_test_dataloader(test_dataset)

    # --- evaluation with generation -------------------------------------------------------------------------
    def evaluate(self, eval_dataset: Dataset | dict[str, Dataset] | None = None, ignore_keys: list[str] | None = None,
                 metric_key_prefix: str = "eval", **gen_kwargs: Any) -> dict[str, float]:
        """`Trainer.evaluate`; with `predict_with_generate`, keyword arguments go to `generate`
        (e.g. `max_new_tokens=10, num_beams=5`)."""
        self._gen_kwargs = self._generation_kwargs(gen_kwargs)
        return super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)

    def predict(self, test_dataset: Dataset, ignore_keys: list[str] | None = None, metric_key_prefix: str = "test",
                **gen_kwargs: Any) -> PredictionOutput:
        """`Trainer.predict`; with `predict_with_generate`, keyword arguments go to `generate` and `predictions`
        are the generated ids without the prompt (`processor.tokenizer.batch_decode` them, -100 -> pad)."""
        self._gen_kwargs = self._generation_kwargs(gen_kwargs)
        return super().predict(test_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)

    def _generation_kwargs(self, gen_kwargs: dict[str, Any]) -> dict[str, Any]:
        """Call-time `generate` arguments over the `Seq2SeqTrainingArguments` ones, as `Seq2SeqTrainer` merges them."""
        if gen_kwargs and not self._predict_with_generate:
            raise TypeError(f"Generation arguments {sorted(gen_kwargs)} were passed, but predict_with_generate is "
                            f"off (found {type(self.args).__name__}); use Seq2SeqTrainingArguments("
                            "predict_with_generate=True).")
        kwargs = dict(gen_kwargs)
        max_length = getattr(self.args, "generation_max_length", None)
        if max_length is not None and kwargs.get("max_length") is None and kwargs.get("max_new_tokens") is None:
            kwargs["max_length"] = max_length  # counts the prompt too for decoder-only LLMs, as in transformers
        num_beams = getattr(self.args, "generation_num_beams", None)
        if num_beams is not None and kwargs.get("num_beams") is None:
            kwargs["num_beams"] = num_beams
        if self._generation_config is not None:
            kwargs.setdefault("generation_config", self._generation_config)
        return kwargs

    # --- loss + per-dataset statistics ----------------------------------------------------------------
    def compute_loss(
        self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """`Trainer.compute_loss` after removing the `dataset` names, which are recorded for the logs, and looking
        `image_ids` up in the vision feature cache."""
        inputs = self.model_inputs(model, inputs, keep=("dataset",))
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

    def prediction_step(
        self, model: torch.nn.Module, inputs: dict[str, Any], prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> tuple[torch.Tensor | None, Any, torch.Tensor | None]:
        """`Trainer.prediction_step` without the `dataset` names (the model does not take them). Prompt-only
        batches take their loss on the training layout; with `predict_with_generate` the predictions are the
        generated ids `[B, N]` without the prompt."""
        inputs = self._prepare_inputs(inputs)
        inputs = self.model_inputs(model, inputs)
        # Decoder-only prompt-only batches carry the training layout of the same records for the loss.
        loss_inputs = {**inputs, **inputs.pop("loss_inputs", {})}
        if not self._predict_with_generate or prediction_loss_only:
            return super().prediction_step(model, loss_inputs, prediction_loss_only, ignore_keys=ignore_keys)
        loss = None
        if "labels" in inputs:
            loss = super().prediction_step(model, loss_inputs, True, ignore_keys=ignore_keys)[0]
        generation_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        # Every process must step together while sharded weights are gathered (as `Seq2SeqTrainer` decides it).
        synced_gpus = is_deepspeed_zero3_enabled() or is_fsdp_managed_module(self.model)
        generated = self.model.generate(**generation_inputs, **{"synced_gpus": synced_gpus, **self._gen_kwargs})
        # decoder-only `generate` returns [B, L_prompt + N]: the prompt, then the new tokens
        generated = new_tokens(generated, generation_inputs["input_ids"] if self._shift else None)
        return loss, generated, inputs.get("labels")  # [B, N], [B, L_answer]

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

