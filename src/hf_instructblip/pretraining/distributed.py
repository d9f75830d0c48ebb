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
