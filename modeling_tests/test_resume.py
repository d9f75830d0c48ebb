"""Resume through `InstructBlipTrainer` with a `BalancedConcatSampler`: interrupted + resumed == uninterrupted.

One process, AdamW with warmup + linear decay (so optimizer and scheduler state must come back too), batch 2 x
gradient accumulation 2 (so the skipped micro-batches are counted right). A run is stopped by a callback at step
k with a checkpoint every step; a model built from another seed resumes from `checkpoint-k`. The rest of the
sample order, every micro-batch loss and the final weights must equal the uninterrupted run's, exactly.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import TrainerCallback

import _distributed_worker as worker
from hf_instructblip import SamplerEpochCallback

STEPS_PER_EPOCH = worker.NUM_SAMPLES // 4  # global batch 2 x 2
MICRO_PER_STEP = 2
ARGS = dict(batch_size=2, gradient_accumulation_steps=MICRO_PER_STEP, learning_rate=5e-3, warmup_steps=2)




class StopAtStep(TrainerCallback):
    """Interrupts training after optimizer step `step` (its checkpoint is still written)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True
        return control


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    trainer = worker.make_trainer(tmp_path_factory.mktemp("uninterrupted"), **ARGS)
    trainer.train()
    return trainer


def test_uninterrupted_run_follows_the_sampler_epoch_by_epoch(uninterrupted):
    sampler = worker.make_sampler(worker.make_dataset())
    expected = np.concatenate([sampler.epoch_indices(epoch) for epoch in range(worker.EPOCHS)]).tolist()
    assert [i for batch in uninterrupted.consumed for i in batch] == expected
    assert len(uninterrupted.consumed) == worker.EPOCHS * STEPS_PER_EPOCH * MICRO_PER_STEP


@pytest.mark.parametrize("stop_step", [1, STEPS_PER_EPOCH, STEPS_PER_EPOCH + 1],
                         ids=["mid-epoch-0", "epoch-boundary", "mid-epoch-1"])
def test_resume_continues_order_losses_and_weights_exactly(uninterrupted, stop_step, tmp_path):
    done = stop_step * MICRO_PER_STEP  # micro-batches consumed before the interruption
    interrupted = worker.make_trainer(tmp_path, callbacks=[StopAtStep(stop_step)], save_strategy="steps",
                                      save_steps=1, **ARGS)
    interrupted.train()
    assert interrupted.state.global_step == stop_step
    assert interrupted.consumed == uninterrupted.consumed[:done]
    assert interrupted.losses == uninterrupted.losses[:done]

    # Another initialisation: weights, optimizer, scheduler and position must all come from the checkpoint.
    resumed = worker.make_trainer(tmp_path, model_seed=1, save_strategy="steps", save_steps=1, **ARGS)
    resumed.train(resume_from_checkpoint=str(tmp_path / f"checkpoint-{stop_step}"))
    assert resumed.state.global_step == uninterrupted.state.global_step
    assert resumed.consumed == uninterrupted.consumed[done:]
    assert resumed.losses == uninterrupted.losses[done:]  # float equality: the same computation, bit for bit
    expected = worker.trainable_weights(uninterrupted.model)
    for name, tensor in worker.trainable_weights(resumed.model).items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0, msg=name)


def test_trainer_adds_one_epoch_callback_for_a_sampler_with_set_epoch(tmp_path):
    """The callback that keeps a resumed epoch's order on several processes comes without being asked for."""
    def epoch_callbacks(trainer):
        return [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, SamplerEpochCallback)]

    trainer = worker.make_trainer(tmp_path, batch_size=2)
    assert [cb.sampler for cb in epoch_callbacks(trainer)] == [trainer.train_sampler]
    own = SamplerEpochCallback(worker.make_sampler(worker.make_dataset()))
    trainer = worker.make_trainer(tmp_path, batch_size=2, callbacks=[own], sampler=own.sampler)
    assert epoch_callbacks(trainer) == [own]  # the caller's own callback for that sampler: no second one
