"""Stage 1 under DDP (2 CPU processes, gloo) == one process on the same global batch with the same negatives: the
contrastive similarities and the ITM negatives span the global batch, the ITG mean is over the global targets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import _stage1_ddp_worker as worker
from test_distributed import WORLD_SIZE, start_torchrun

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")


def test_two_processes_give_the_same_losses_and_update_as_one(tmp_path):
    process = start_torchrun(tmp_path, script=Path(worker.__file__).resolve())
    try:
        single_losses, single_weights = worker.run(None)
    finally:
        output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, f"torchrun failed ({process.returncode}):\n{output[-6000:]}"
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD_SIZE)]
    for step, expected in enumerate(single_losses):
        for name, value in expected.items():  # each rank's loss is its share: their mean is the global loss
            mean = sum(rank[step][name] for rank in ranks) / WORLD_SIZE
            assert mean == pytest.approx(value, abs=1e-5), (step, name)
        assert ranks[0][step]["loss_itg"] != pytest.approx(ranks[1][step]["loss_itg"], abs=1e-3)  # not trivially
    for rank in range(WORLD_SIZE):
        weights = load_file(tmp_path / f"rank{rank}.safetensors")
        assert weights.keys() == single_weights.keys()
        for name, value in single_weights.items():
            torch.testing.assert_close(weights[name], value, atol=1e-5, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    moved = worker.run(None, world_size=1)[1]  # the steps change the weights (the comparison is not vacuous)
    initial = {n: p for n, p in worker.stage1_cases.model(seed=0).named_parameters() if p.requires_grad}
    assert all(not torch.equal(moved[n], initial[n]) for n in ("query_tokens", "temp", "itg_head.dense.weight",
                                                                "vision_model.post_layernorm.weight"))
