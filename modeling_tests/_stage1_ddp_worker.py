"""Stage-1 pretraining steps on a global batch: one process (`run(None, ...)`), or one rank of a 2-process gloo
group holding its half of every global batch (`run(rank, ...)`, as a script under torchrun:
`python -m torch.distributed.run --nproc_per_node 2 _stage1_ddp_worker.py OUT_DIR`).

Same model, data and ITM negatives (global indices) either way; SGD, 2 steps. Writes `OUT_DIR/rank{R}.json` (each
step's losses) and `OUT_DIR/rank{R}.safetensors` (the trained weights after the steps).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

import stage1_cases

GLOBAL_BATCH = 4
STEPS = 2
CAPTIONS = ["a red circle on a white background", "two shapes", "the circle is red",
            "a small dog sitting on grass", "a blue square and a green triangle", "a square",
            "two yellow stars in the sky", "it is a dog"]  # unequal lengths: ranks hold unequal ITG target counts
NEGATIVE_IMAGES = [[2, 3, 0, 1], [1, 0, 3, 2]]  # per step, global rows: crossing ranks and within a rank
NEGATIVE_TEXTS = [[3, 2, 1, 0], [2, 3, 0, 1]]


def run(rank: int | None, world_size: int = 1) -> tuple[list[dict[str, float]], dict[str, torch.Tensor]]:
    model = stage1_cases.model(seed=0).train()
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    wrapped = model
    if rank is not None:
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(list(trained.values()), lr=0.5)
    local = GLOBAL_BATCH // world_size
    rows = slice(0, GLOBAL_BATCH) if rank is None else slice(rank * local, (rank + 1) * local)
    losses = []
    for step in range(STEPS):
        captions = CAPTIONS[step * GLOBAL_BATCH:(step + 1) * GLOBAL_BATCH][rows]
        batch = {"pixel_values": stage1_cases.tiny.pixel_values(GLOBAL_BATCH, seed=step)[rows],
                 **stage1_cases.text_batch(captions)}
        out = wrapped(**batch, negative_image_indices=torch.tensor(NEGATIVE_IMAGES[step][rows]),
                      negative_text_indices=torch.tensor(NEGATIVE_TEXTS[step][rows]))
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append({name: float(getattr(out, name).detach()) for name in ("loss", "loss_itc", "loss_itm", "loss_itg")})
    return losses, {n: p.detach().clone() for n, p in trained.items()}


def main(out_dir: Path) -> None:
    torch.distributed.init_process_group("gloo")
    rank, size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    losses, weights = run(rank, size)
    (out_dir / f"rank{rank}.json").write_text(json.dumps(losses))
    save_file(weights, out_dir / f"rank{rank}.safetensors")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
