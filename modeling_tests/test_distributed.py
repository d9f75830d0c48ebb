"""Two processes (torchrun, gloo, CPU) through `InstructBlipTrainer` + `BalancedConcatSampler` == one process.

The torchrun worker (`_distributed_worker.py`) trains with per-device batch 2 on 2 ranks; the reference here trains
the same model, data and sampler in this process with batch 4, the same global batch. Each rank must consume its
own half of every global batch (together exactly the one-process sequence, no overlap), both epochs must follow
the sampler's per-epoch order, and the weights must end where the one-process run ends. The worker also resumes
mid-epoch 1 from a checkpoint on both ranks: the case where, without `SamplerEpochCallback`, the resumed epoch
replays epoch 0's order.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import _distributed_worker as worker
import hf_instructblip

WORKER = Path(worker.__file__).resolve()
WORLD_SIZE = 2
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_torchrun(out_dir: Path, script: Path = WORKER) -> subprocess.Popen:
    """`script OUT_DIR` (default: the DDP worker) on 2 CPU processes, importing the same `hf_instructblip` as this
    process."""
    package_root = str(Path(hf_instructblip.__file__).resolve().parents[1])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD_SIZE),
               "--master_port", str(free_port()), str(script), str(out_dir)]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(per-rank records and weights from torchrun, the one-process reference trainer)."""
    out_dir = tmp_path_factory.mktemp("torchrun")
    process = start_torchrun(out_dir)  # runs while this process trains the reference
    try:
        single = worker.make_trainer(tmp_path_factory.mktemp("single"), batch_size=WORLD_SIZE * 2,
                                     **worker.DISTRIBUTED_ARGS)
        single.train()
    finally:
        output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, f"torchrun failed ({process.returncode}):\n{output[-6000:]}"
    ranks = []
    for rank in range(WORLD_SIZE):
        record = json.loads((out_dir / f"rank{rank}.json").read_text())
        assert (record["rank"], record["world_size"]) == (rank, WORLD_SIZE)
        record["full"] = load_file(out_dir / f"rank{rank}_full.safetensors")
        record["resumed"] = load_file(out_dir / f"rank{rank}_resumed.safetensors")
        ranks.append(record)
    return ranks, single


def test_one_process_follows_the_sampler_epoch_by_epoch(runs):
    _, single = runs
    sampler = worker.make_sampler(worker.make_dataset())
    expected = np.concatenate([sampler.epoch_indices(epoch) for epoch in range(worker.EPOCHS)]).tolist()
    assert [i for batch in single.consumed for i in batch] == expected
    assert expected[: worker.NUM_SAMPLES] != expected[worker.NUM_SAMPLES:]  # epoch 1 is reshuffled


def test_ranks_split_every_global_batch_without_overlap(runs):
    ranks, single = runs
    steps = worker.EPOCHS * worker.NUM_SAMPLES // (WORLD_SIZE * 2)
    assert len(single.consumed) == steps and all(len(r["consumed"]) == steps for r in ranks)
    # accelerate hands rank r the r-th per-device batch of each global batch: their concatenation is the step.
    for step in range(steps):
        assert ranks[0]["consumed"][step] + ranks[1]["consumed"][step] == single.consumed[step], step
    per_epoch = steps // worker.EPOCHS
    for epoch in range(worker.EPOCHS):
        window = slice(epoch * per_epoch, (epoch + 1) * per_epoch)
        seen = [{i for batch in r["consumed"][window] for i in batch} for r in ranks]
        assert sum(len(s) for s in seen) == worker.NUM_SAMPLES  # distinct indices: the check below means something
        assert not seen[0] & seen[1], f"epoch {epoch}: ranks share samples {seen[0] & seen[1]}"


def test_two_processes_end_with_the_one_process_weights(runs):
    ranks, single = runs
    expected = worker.trainable_weights(single.model)
    initial = worker.trainable_weights(worker.make_model(worker.make_processor()))
    assert ranks[0]["full"].keys() == expected.keys()
    assert max((expected[n] - initial[n]).abs().max().item() for n in expected) > 1e-2  # training moved them
    for name, tensor in expected.items():
        torch.testing.assert_close(ranks[0]["full"][name], ranks[1]["full"][name], rtol=0, atol=0, msg=name)
        torch.testing.assert_close(ranks[0]["full"][name], tensor, rtol=0, atol=1e-5, msg=name)


def test_resume_mid_epoch_on_two_ranks_continues_the_same_order_and_weights(runs):
    ranks, _ = runs
    for record in ranks:
        assert record["resumed_consumed"] == record["consumed"][worker.RESUME_STEP:]
        for name, tensor in record["full"].items():
            torch.testing.assert_close(record["resumed"][name], tensor, rtol=0, atol=1e-6, msg=name)
