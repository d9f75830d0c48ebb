"""FSDP2 (accelerate, via `TrainingArguments(fsdp=..., fsdp_config=...)`) on 2 CPU processes (gloo) == one process.

`_fsdp_worker.py` trains the tiny setup of `_distributed_worker.py` (Q-Former only, `BalancedConcatSampler`, our
collator) with per-device batch 2 on 2 ranks; the reference here trains it in this process with batch 4, the same
global batch, recording its trained weights at the checkpoint step and at the end. Checked: the wrap (one unit per
block, the LM head alone), the weights after every step, the fused head loss running on the gathered head, resume
from a sharded checkpoint, and that sharded and full checkpoints read back through `load_trainable_weights` and
`from_pretrained`, and bf16 mixed precision with the README's dtype layout. Separately, the fused head loss under
hand-made FSDP1 / FSDP2 shardings: it runs where the head is its own unit (or in the root unit) and falls back to
logits inside a larger unit, with the same loss and gradients either way.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

import _distributed_worker as worker
import _fsdp_worker as fsdp_worker
import hf_instructblip
from hf_instructblip import InstructBlipForConditionalGeneration, load_trainable_weights
from test_distributed import start_torchrun

WORLD_SIZE = 2
STEPS = worker.EPOCHS * worker.NUM_SAMPLES // (WORLD_SIZE * 2)
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")


class Snapshot(TrainerCallback):
    """The trainable weights after optimizer step `step`."""

    def __init__(self, step: int) -> None:
        self.step, self.weights = step, None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            self.weights = worker.trainable_weights(model)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(the worker's output folder and record.json, the one-process reference trainer, its checkpoint-step weights)."""
    out_dir = tmp_path_factory.mktemp("fsdp")
    process = start_torchrun(out_dir, Path(fsdp_worker.__file__).resolve())  # runs while the reference trains
    try:
        snapshot = Snapshot(worker.RESUME_STEP)
        single = worker.make_trainer(tmp_path_factory.mktemp("single"), batch_size=WORLD_SIZE * 2,
                                     callbacks=[snapshot], **worker.DISTRIBUTED_ARGS)
        single.train()
    finally:
        output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, f"torchrun failed ({process.returncode}):\n{output[-6000:]}"
    return out_dir, json.loads((out_dir / "record.json").read_text()), single, snapshot.weights


def assert_weights(got: dict, expected: dict, atol: float) -> None:
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=atol, msg=name)


def test_fsdp_runs_one_unit_per_block_and_the_head_alone(runs):
    _, record, _, _ = runs
    assert (record["world_size"], record["fsdp_enabled"]) == (WORLD_SIZE, True)
    # `_no_split_modules` (ours + the LLM's) are the units; accelerate adds the LLM's input embeddings and LM head.
    assert record["units"] == ["", "vision_model.encoder.layers.0", "vision_model.encoder.layers.1",
                               "qformer.embeddings", "qformer.encoder.layer.0", "qformer.encoder.layer.1",
                               "qformer.encoder.layer.2", "language_model.model.embed_tokens",
                               "language_model.model.layers.0", "language_model.model.layers.1",
                               "language_model.lm_head"]


def test_two_fsdp_processes_end_with_the_one_process_weights(runs):
    out_dir, _, single, _ = runs
    expected = worker.trainable_weights(single.model)
    initial = worker.trainable_weights(worker.make_model(worker.make_processor()))
    assert max((expected[n] - initial[n]).abs().max().item() for n in expected) > 1e-2  # training moved them
    assert_weights(load_file(out_dir / "sharded.safetensors"), expected, atol=1e-5)
    consumed = [json.loads((out_dir / f"consumed{rank}.json").read_text())["sharded"] for rank in range(WORLD_SIZE)]
    assert [a + b for a, b in zip(*consumed)] == single.consumed  # each rank its half of every global batch


def test_fused_head_loss_ran_on_the_gathered_head_in_every_training_step(runs):
    _, record, _, _ = runs
    assert record["head_widths"] == [0] * STEPS  # the head computed no logits: the loss was taken inside its call


def test_bf16_mixed_precision_trains_fp32_weights_beside_bf16_frozen_ones(runs):
    out_dir, record, single, _ = runs
    mixed = record["bf16"]
    assert (mixed["frozen_dtypes"], mixed["trained_dtypes"]) == (["torch.bfloat16"], ["torch.float32"])
    assert mixed["head_widths"] == [0, 0]
    losses = [json.loads((out_dir / f"consumed{rank}.json").read_text())["bf16_losses"] for rank in range(WORLD_SIZE)]
    # Each rank's loss is its share of the global batch's; their mean is the one-process loss (here in bf16).
    first = sum(rank_losses[0] for rank_losses in losses) / WORLD_SIZE
    assert first == pytest.approx(single.losses[0], rel=2e-2)


def test_resume_from_a_sharded_checkpoint_continues_the_same_order_and_weights(runs):
    out_dir, _, _, _ = runs
    for rank in range(WORLD_SIZE):
        consumed = json.loads((out_dir / f"consumed{rank}.json").read_text())
        assert consumed["resumed"] == consumed["sharded"][worker.RESUME_STEP:]
    assert_weights(load_file(out_dir / "resumed.safetensors"), load_file(out_dir / "sharded.safetensors"), atol=1e-6)


def test_sharded_checkpoint_reads_back_as_trainable_weights_and_merged_full_weights(runs):
    from accelerate.utils import merge_fsdp_weights

    out_dir, _, _, at_checkpoint = runs
    checkpoint = out_dir / "run" / f"checkpoint-{worker.RESUME_STEP}"
    base = worker.make_model(worker.make_processor())
    frozen = {n: p.detach().clone() for n, p in base.named_parameters() if not p.requires_grad}
    load_trainable_weights(base, checkpoint)  # gathered from the shards when saved
    assert_weights(worker.trainable_weights(base), at_checkpoint, atol=1e-5)

    # What the README says: `accelerate merge-weights CKPT/pytorch_model_fsdp_0 CKPT`, then `from_pretrained(CKPT)`.
    merge_fsdp_weights(str(checkpoint / "pytorch_model_fsdp_0"), str(checkpoint))
    merged = InstructBlipForConditionalGeneration.from_pretrained(checkpoint)
    hf_instructblip.freeze_for_instruction_tuning(merged)
    assert_weights(worker.trainable_weights(merged), at_checkpoint, atol=1e-5)
    assert_weights({n: p.detach() for n, p in merged.named_parameters() if not p.requires_grad}, frozen, atol=0)


def test_full_state_dict_save_loads_with_from_pretrained_and_names_our_code(runs):
    out_dir, _, _, at_checkpoint = runs
    folder = out_dir / "full_model"
    loaded = InstructBlipForConditionalGeneration.from_pretrained(folder)
    hf_instructblip.freeze_for_instruction_tuning(loaded)
    assert_weights(worker.trainable_weights(loaded), at_checkpoint, atol=1e-5)  # trained RESUME_STEP steps
    initial = worker.make_model(worker.make_processor())
    expected_frozen = {n: p.detach() for n, p in initial.named_parameters() if not p.requires_grad}
    assert_weights({n: p.detach() for n, p in loaded.named_parameters() if not p.requires_grad}, expected_frozen,
                   atol=0)
    # FSDP2 makes the model an instance of a class defined in torch: the saved code must still be ours.
    auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModel"] == "modeling.InstructBlipForConditionalGeneration"
    assert (folder / "modeling.py").is_file() and not list(folder.glob("_fsdp*.py"))


@pytest.mark.parametrize("placement, fused", [
    ("fsdp2_head_unit", True),  # accelerate's layout: the unit's pre-forward gathers the head before our hook
    ("fsdp2_head_in_root", True),  # gathered with the root, whose output (the loss) FSDP hooks for backward
    ("fsdp2_head_in_llm_unit", False),  # the loss would bypass the LLM unit's outputs, so no re-gather for backward
    ("fsdp1_head_unit", False),  # the head is an FSDP1 wrapper
    ("fsdp1_head_in_root", False),  # FSDP1 hands the forward plain tensor views, not parameters
])
def test_fused_head_loss_under_sharding_runs_or_falls_back_with_the_same_gradients(runs, placement, fused):
    _, record, _, _ = runs
    result = record["placements"][placement]
    (width,) = result["head_widths"]  # one forward
    assert (width == 0) == fused, width  # 0: no logits, the loss was taken inside the head's call
    assert result["loss_error"] <= 1e-5
    assert result["grad_error"] <= 1e-5 * max(result["grad_scale"], 1.0)


def test_trainer_refuses_the_vision_cache_under_fsdp(runs):
    _, record, _, _ = runs
    assert "`vision_feature_cache` cannot be used under FSDP" in record["refusals"]["vision_feature_cache"]
