"""Global-batch gathers for the stage-1 losses: the contrastive similarities and the hard negatives span every
process's batch (LAVIS `all_gather_with_grad` / `concat_all_gather`). One process (or no process group): identity.

`gather_with_grad` keeps the graph: its backward sums every process's gradient for the local slice (ITM's negative
images). `gather_no_grad` detaches (ITC's gathered side: LAVIS's contrastive gradient flows through each row's own
image / text features only). With DDP averaging the gradients, one step equals one process's step on the
concatenated global batch either way.

Example:
    >>> gather_with_grad(torch.ones(2, 3)).shape  # no process group: the tensor itself
    torch.Size([2, 3])
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """`(rank, world size)`; `(0, 1)` without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0; backward: all-reduce (sum) the gradient, keep this process's slice."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        rank, size = world()
        ctx.rank, ctx.rows = rank, tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Every process's `tensor` concatenated along dim 0, differentiable (equal shapes on every process)."""
    return tensor if world()[1] == 1 else GatherWithGrad.apply(tensor)


@torch.no_grad()
def gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Every process's `tensor` concatenated along dim 0, detached (one process too): LAVIS's `concat_all_gather`
    under the process group its training always runs in (token ids, masks, the ITC's other side)."""
    if world()[1] == 1:
        return tensor.detach()
    parts = [torch.empty_like(tensor) for _ in range(world()[1])]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


def global_sum(value: torch.Tensor) -> torch.Tensor:
    """`value` summed over processes (no gradient): e.g. the global number of ITG target tokens."""
    if world()[1] == 1:
        return value
    value = value.detach().clone()
    dist.all_reduce(value)
    return value


def check_global_batch(batch: int, texts: int) -> int:
    """The global batch size, checked: one caption per image, the same batch on every process (the gathers and the
    global targets assume it), and at least 2 pairs (ITM draws a negative among the others)."""
    if texts != batch:
        raise ValueError(f"`input_ids` must hold one caption per image: {batch} images, found {texts} captions.")
    sizes = [batch]
    if world()[1] > 1:
        found = gather_no_grad(torch.tensor([batch], device=_device()))
        sizes = found.tolist()
    if len(set(sizes)) > 1:
        raise ValueError(f"every process must hold the same batch size (the contrastive targets and gathers assume "
                         f"it), found {sizes}; drop the last incomplete batch (`dataloader_drop_last=True`).")
    if batch * len(sizes) < 2:
        raise ValueError(f"stage 1 needs at least 2 image-caption pairs in the global batch (ITM draws each pair's "
                         f"negative among the others), found {batch * len(sizes)}; use `dataloader_drop_last=True` "
                         "or a larger batch.")
    return batch * len(sizes)


def _device() -> torch.device:
    """Where the process group's collectives run (gloo: the CPU; nccl: this process's GPU)."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
