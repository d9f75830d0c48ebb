"""`QFormerPretrainingTrainer`: stage-1 pretraining with the stock `Trainer` and the shared InstructBLIP glue.

What it changes (besides `InstructBlipTrainerGlue`):
- the vision encoder is frozen at construction (its final LayerNorm, LAVIS's `ln_vision`, keeps training);
- the last incomplete batch is dropped (`dataloader_drop_last=True`, as LAVIS's loaders);
- the logs carry `loss_itc`, `loss_itm` and `loss_itg`, averaged over the micro-batches since the last log and
  over processes.
Checkpoints are the model's `save_pretrained` folders (transformers' `Blip2ForImageTextRetrieval` layout);
`resume_from_checkpoint` is `Trainer`'s.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Trainer

from ..training.trainer_glue import InstructBlipTrainerGlue
from .modeling import QFormerForPretraining

PER_LOSS = ("loss_itc", "loss_itm", "loss_itg")


class QFormerPretrainingTrainer(InstructBlipTrainerGlue, Trainer):
    """`Trainer` for BLIP-2 stage 1 (`QFormerForPretraining` + `QFormerPretrainingCollator`).

    Args (besides `Trainer`'s and the glue's): freeze_vision_encoder: freeze the vision encoder (default True).

    Example:
        >>> trainer = QFormerPretrainingTrainer(model=model, args=TrainingArguments("out", logging_steps=10),
        ...                                     train_dataset=records, data_collator=collator)
        >>> trainer.train()  # logs loss, loss_itc, loss_itm, loss_itg
    """

    def __init__(self, *args: Any, freeze_vision_encoder: bool = True, **kwargs: Any) -> None:
        if not isinstance(freeze_vision_encoder, bool):
            raise TypeError(f"`freeze_vision_encoder` must be a bool, found {type(freeze_vision_encoder).__name__}.")
        for name, off in (("save_trainable_only", False), ("vision_feature_cache", None)):
            if kwargs.get(name, off) is not off:
                raise ValueError(f"`{name}`: expected {off!r}; it serves InstructBLIP models, and stage-1 checkpoints "
                                 "are whole Blip2ForImageTextRetrieval folders.")
        super().__init__(*args, **kwargs)
        # Every global batch needs >= 2 pairs of one size on every process (ITM negatives, contrastive targets): the
        # last incomplete batch is dropped, as LAVIS's training loaders do.
        self.args.dataloader_drop_last = True
        model = self.accelerator.unwrap_model(self.model)
        if not isinstance(model, QFormerForPretraining):
            raise TypeError(f"`model` must be a QFormerForPretraining, found {type(model).__name__}.")
        if freeze_vision_encoder:
            model.freeze_vision_encoder()
        collator = self.data_collator
        if hasattr(collator, "check_model"):
            collator.check_model(model.config)
        self._loss_sums = torch.zeros(len(PER_LOSS))
        self._loss_count = 0

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """The model's `loss` (ITC + ITM + ITG); the three parts are recorded for the logs."""
        outputs = model(**self.model_inputs(model, inputs))
        if model.training:
            # Kept on the device until a log step: reading them every step would sync the host.
            parts = torch.stack([getattr(outputs, name).detach().float() for name in PER_LOSS])
            self._loss_sums = parts if self._loss_count == 0 else self._loss_sums + parts
            self._loss_count += 1
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs and self._loss_count:  # training logs only
            means = (self._loss_sums / self._loss_count).to(self.args.device)
            means = self.accelerator.reduce(means, reduction="mean") if self.args.world_size > 1 else means
            logs = {**logs, **{name: round(float(v), 4) for name, v in zip(PER_LOSS, means)}}
            self._loss_count = 0
        super().log(logs, *args, **kwargs)
