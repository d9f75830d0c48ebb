"""DeepSpeed ZeRO-2 / ZeRO-3 engines through `InstructBlipTrainer` (2 CPU processes, gloo) == one process.

`_deepspeed_worker.py` trains the tiny setup of `_distributed_worker.py` with per-device batch 2 on 2 ranks under
the shipped `examples/multi_gpu/ds_zero{2,3}.json`; the reference trains it here with batch 4, the same global batch.
Checked: the weights at the end, the sample order, the fused head loss running on ZeRO-3's gathered head, and that
both saves (trained weights only, gathered from the shards; the full 16-bit-gather model) read back.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import _deepspeed_worker as ds_worker
import _distributed_worker as worker
from hf_instructblip import InstructBlipForConditionalGeneration, freeze_for_instruction_tuning, load_trainable_weights
from test_fsdp import WORLD_SIZE, assert_weights, start_torchrun

STEPS = worker.EPOCHS * worker.NUM_SAMPLES // (WORLD_SIZE * 2)
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(the worker's output folder, the one-process reference trainer)."""
    out_dir = tmp_path_factory.mktemp("deepspeed")
    process = start_torchrun(out_dir, Path(ds_worker.__file__).resolve())  # runs while the reference trains
    try:
        single = worker.make_trainer(tmp_path_factory.mktemp("single"), batch_size=WORLD_SIZE * 2,
                                     **worker.DISTRIBUTED_ARGS)
        single.train()
    finally:
        output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, f"torchrun failed ({process.returncode}):\n{output[-6000:]}"
    return out_dir, single


def records(out_dir: Path, stage: int) -> list[dict]:
    return [json.loads((out_dir / f"zero{stage}_rank{rank}.json").read_text()) for rank in range(WORLD_SIZE)]


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_stage_ends_with_the_one_process_weights_and_order(runs, stage):
    out_dir, single = runs
    ranks = records(out_dir, stage)
    assert all((r["world_size"], r["deepspeed"], r["zero3_partitioned"]) == (WORLD_SIZE, True, stage == 3)
               for r in ranks)
    assert [a + b for a, b in zip(ranks[0]["consumed"], ranks[1]["consumed"])] == single.consumed
    assert_weights(load_file(out_dir / f"zero{stage}.safetensors"), worker.trainable_weights(single.model), atol=1e-5)


@pytest.mark.parametrize("stage", [2, 3])
def test_fused_head_loss_ran_in_every_training_step(runs, stage):
    out_dir, _ = runs
    for record in records(out_dir, stage):
        assert record["head_widths"] == [0] * STEPS  # under ZeRO-3: on the head the engine gathered before our hook


@pytest.mark.parametrize("stage", [2, 3])
def test_trainable_only_save_is_gathered_from_the_shards(runs, stage):
    out_dir, single = runs
    base = worker.make_model(worker.make_processor())
    load_trainable_weights(base, out_dir / f"zero{stage}_trainable")
    assert_weights(worker.trainable_weights(base), worker.trainable_weights(single.model), atol=1e-5)


def test_zero3_full_save_loads_with_from_pretrained(runs):
    out_dir, single = runs
    loaded = InstructBlipForConditionalGeneration.from_pretrained(out_dir / "zero3_model")
    freeze_for_instruction_tuning(loaded)
    assert_weights(worker.trainable_weights(loaded), worker.trainable_weights(single.model), atol=1e-5)
    initial = worker.make_model(worker.make_processor())
    assert_weights({n: p.detach() for n, p in loaded.named_parameters() if not p.requires_grad},
                   {n: p.detach() for n, p in initial.named_parameters() if not p.requires_grad}, atol=0)
