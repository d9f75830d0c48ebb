"""The fused head loss (`forward(fused_head_loss=True)`) with a ZeRO-3-partitioned LM head, through a fake.

DeepSpeed is not a dependency (it builds from source only) and its engine needs an accelerator, so `FakeZero3` does to
the head what ZeRO-3 does, without the communication: between calls each parameter's `.data` is an empty tensor (the
local shard), and hooks the engine registers when it is built, so before any of ours, gather the whole tensor before
the head runs and release it after. Where the gather runs after our hook, or around the call as
`deepspeed.zero.GatheredParameters` does, the loss must still be right; the fused path may only run on a whole head.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import pytest
import torch
from torch import nn

import _distributed_worker as worker
from _fsdp_worker import fixed_batch, record_head_widths


class FakeZero3:
    """ZeRO-3's treatment of `module`'s own parameters, in one process."""

    def __init__(self, module: nn.Module, gather_in_forward: bool = False) -> None:
        self.module = module
        self.whole = {name: p.data for name, p in module.named_parameters(recurse=False)}
        self.release()
        if gather_in_forward:  # the gather runs inside the call, after every pre-hook (like accelerate's offload)
            forward = module.forward

            def gathering_forward(*args, **kwargs):
                with self.gathered():
                    return forward(*args, **kwargs)

            module.forward = gathering_forward
        else:  # the engine's hooks: registered at `deepspeed.initialize`, before our per-call hook
            module.register_forward_pre_hook(lambda _module, _args: self.gather())
            module.register_forward_hook(lambda _module, _args, _output: self.release())

    def gather(self) -> None:
        for name, data in self.whole.items():
            getattr(self.module, name).data = data

    def release(self) -> None:
        for name, data in self.whole.items():
            getattr(self.module, name).data = torch.empty(0, dtype=data.dtype)  # as `param.data` of a ZeRO-3 shard

    @contextmanager
    def gathered(self) -> Iterator[None]:
        """`deepspeed.zero.GatheredParameters(module.parameters())`."""
        self.gather()
        try:
            yield
        finally:
            self.release()


@pytest.fixture(scope="module")
def reference():
    """(batch, loss and trained gradients of the unpartitioned model, taken from its full logits)."""
    batch = fixed_batch()
    model = worker.make_model(worker.make_processor()).train()
    output = model(**batch)
    output.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return batch, output.loss.detach(), grads


def fused_run(batch, partition: str) -> tuple[torch.Tensor, dict, list[int], FakeZero3]:
    model = worker.make_model(worker.make_processor()).train()
    zero3 = FakeZero3(model.language_model.get_output_embeddings(), gather_in_forward=partition == "in_forward")
    widths = record_head_widths(model)
    if partition == "gathered_around":
        with zero3.gathered():
            output = model(**batch, fused_head_loss=True)
    else:
        output = model(**batch, fused_head_loss=True)
    output.loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    return output.loss.detach(), grads, widths, zero3


@pytest.mark.parametrize("partition, fused", [
    ("engine_hooks", True),  # gathered by the engine's pre-hook, before ours: the loss is taken on the whole head
    ("gathered_around", True),  # whole for the entire call (GatheredParameters)
    ("in_forward", False),  # our hook sees the empty shard: the head computes logits once it has gathered
])
def test_partitioned_head_gives_the_full_logits_loss_and_gradients(reference, partition, fused):
    batch, expected_loss, expected_grads = reference
    loss, grads, widths, zero3 = fused_run(batch, partition)
    assert (widths == [0]) == fused, widths
    torch.testing.assert_close(loss, expected_loss, rtol=0, atol=1e-5)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    head = zero3.module
    assert head.weight.numel() == 0  # released again after the call
    assert not any(hook.__qualname__.startswith("head_loss_instead_of_logits") for hook in
                   head._forward_pre_hooks.values())  # our per-call hook is gone
