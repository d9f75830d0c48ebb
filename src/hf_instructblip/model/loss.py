"""The language-modelling loss: per-token cross-entropy, its normalisation, and the fused frozen-head path.

One rule aligns labels everywhere (`align_labels`): a decoder-only LLM's position t predicts label t + 1, an
encoder-decoder LLM's decoder position t predicts label t.

Fused path: with the LLM frozen, its LM head is the widest layer of a training step (transformers keeps the
`[N, vocab]` logits, their log-softmax and two gradients of that size). Here the head runs on chunks of rows and,
its weight being frozen, each chunk's gradient w.r.t. the hidden states (`(softmax - onehot) @ W`) is computed
at once: one chunk of logits is alive at a time, and backward is a multiply.

Example:
    >>> loss = frozen_head_cross_entropy(hidden, head.weight, head.bias, labels).sum() / (labels != -100).sum()
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn

try:
    from torch.distributed.fsdp import FSDPModule
except ImportError:  # torch built without distributed support: no FSDP units
    FSDPModule = ()


def target_labels(labels: torch.Tensor, shift: bool) -> torch.Tensor:
    """The labels that are scored: with `shift` (decoder-only LLMs) the first has no position predicting it."""
    return labels[:, 1:] if shift else labels


def align_labels(scores: torch.Tensor, labels: torch.Tensor, shift: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """`(scores, labels)` position by position: with `shift` position t scores label t + 1, so the last score
    drops out too. `scores` is `[B, L, ...]` (logits or hidden states)."""
    return (scores[:, :-1] if shift else scores), target_labels(labels, shift)


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, shift: bool) -> torch.Tensor:
    """Float32 cross-entropy per label position, 0 where the label is -100: `[B, L]` (`[B, L - 1]` with `shift`)."""
    logits, labels = align_labels(logits, labels.to(logits.device), shift)
    losses = nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="none"
    )
    return losses.view(labels.shape)


def per_item(total: torch.Tensor, labels: torch.Tensor, num_items_in_batch: int | torch.Tensor | None) -> torch.Tensor:
    """`total / num_items_in_batch`, or over the labelled (not -100) entries of the already aligned `labels`.

    `Trainer` passes `num_items_in_batch` = labelled tokens across all accumulated micro-batches, which makes
    gradient accumulation exact; without it this is the mean over this batch's labelled tokens. A count of 0
    (every label -100) divides by 1: the loss is then 0 with zero gradients, not NaN that would poison a run.
    """
    if num_items_in_batch is None:
        num_items_in_batch = (labels != -100).sum()
    if isinstance(num_items_in_batch, torch.Tensor):
        return total / num_items_in_batch.to(total.device).clamp(min=1)
    return total / max(num_items_in_batch, 1)


# LLM architectures whose forward ends with `logits = lm_head(hidden)`: nothing (soft-capping, scaling) after it.
HEAD_IS_LAST_LAYER = frozenset({"llama", "mistral", "qwen2", "opt", "t5", "mt5"})
CHUNK_ELEMENTS = 2**21  # logits per chunk (8 MiB in float32); smaller chunks slow the head's matmuls on CPU
MIN_CHUNK_ROWS = 64  # large vocabularies (mT5's 250k) still get matmuls of useful height


class _FrozenHeadCrossEntropy(torch.autograd.Function):
    """Per-row cross-entropy `[M]` of `hidden @ weight.T + bias` against `labels` (every row labelled)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk_rows: int):  # [M, D], [V, D], [V] | None, [M]
        losses = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)  # [M]
        grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None  # [M, D]
        for start in range(0, hidden.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            logits = nn.functional.linear(hidden[rows], weight, bias)  # [C, V]
            log_probs = torch.log_softmax(logits.float(), dim=-1)  # [C, V]
            del logits
            target = labels[rows, None]  # [C, 1]
            losses[rows] = -log_probs.gather(1, target).squeeze(1)
            if grad is not None:
                # softmax(log p) = p. Not `log_probs.exp()`: the element-wise exp of very negative values (denormal
                # results) runs ~15x slower on CPU than the softmax kernel.
                probs = torch.softmax(log_probs, dim=-1)  # [C, V]
                del log_probs
                probs.scatter_add_(1, target, probs.new_full(target.shape, -1.0))  # d loss_i / d logits_i
                grad[rows] = probs.to(weight.dtype) @ weight
        ctx.save_for_backward(grad)
        return losses

    @staticmethod
    def backward(ctx, grad_losses):  # [M]
        (grad,) = ctx.saved_tensors
        scaled = grad.float() * grad_losses[:, None]  # in float32: a bf16 1 / num_items would be off by up to 2^-9
        return scaled.to(grad.dtype), None, None, None, None


def frozen_head_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor
) -> torch.Tensor:
    """Cross-entropy of `hidden @ weight.T + bias` at every position of `labels`, 0 where the label is -100.

    `hidden` `[..., D]` and `labels` `[...]` align position by position; the result has `labels`' shape and is
    float32. The weight and bias get no gradient.
    """
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"`labels` must have shape {tuple(hidden.shape[:-1])} to match `hidden`, found "
                         f"{tuple(labels.shape)}.")
    labels = labels.to(hidden.device)
    keep = labels != -100
    chunk_rows = max(MIN_CHUNK_ROWS, CHUNK_ELEMENTS // weight.shape[0])
    losses = _FrozenHeadCrossEntropy.apply(hidden[keep], weight, bias, labels[keep], chunk_rows)  # [M]
    return torch.zeros(labels.shape, dtype=losses.dtype, device=losses.device).masked_scatter(keep, losses)


def head_is_plain_linear(head: nn.Module | None) -> bool:
    """Whether `head` is a plain `nn.Linear` holding its own parameters as ordinary tensors (not a PEFT wrapper,
    DTensor or flattened FSDP1 view), or an FSDP2 unit of its own (as accelerate's FSDP2 makes it); whether they are
    whole, frozen and in place is checked at call time.

    A head inside a larger FSDP2 unit (its weights DTensors here, gathered only when that unit runs) is refused: the
    loss taken in its call leaves the unit without passing through the unit's outputs, where FSDP hooks the
    re-gathering of the unit's other weights for backward.
    """
    own_unit = isinstance(head, FSDPModule) and type(head).__bases__ == (FSDPModule, nn.Linear)
    if not (type(head) is nn.Linear or own_unit) or not isinstance(head.weight, nn.Parameter):
        return False
    # An own unit holds DTensor shards between calls; its pre-forward, which runs before ours, gathers them.
    return own_unit or all(type(p.data) is torch.Tensor for p in (head.weight, head.bias) if p is not None)


def _usable_here(module: nn.Linear, hidden: torch.Tensor) -> bool:
    """Whether the weights the head is about to use are real, frozen and beside `hidden` at this moment.

    accelerate's offload / multi-device hooks wrap `forward`, so they run after this pre-hook: an offloaded
    weight is still on `meta` and a weight on another device still apart from its input; a ZeRO-3 shard whose
    gather has not run yet is empty. Then the head runs as usual and the caller takes the loss from its logits.
    """
    whole = module.weight.dim() == 2 and module.weight.shape[1] == hidden.shape[-1] > 0  # not a gathered-later shard
    return whole and all(
        type(p.data) is torch.Tensor  # a DTensor still here is a shard: its gather did not run first
        and not p.requires_grad and not p.is_meta and p.device == hidden.device
        for p in (module.weight, module.bias) if p is not None
    )


@contextmanager
def head_loss_instead_of_logits(
    head: nn.Linear, labels: torch.Tensor, shift: bool, result: dict
) -> Iterator[None]:
    """While active, `head` puts the per-position losses of its input against `labels` in `result["token_losses"]`
    (`[B, L]`, or `[B, L - 1]` with `shift`) and returns empty logits; where its weights are not usable in
    place (see `_usable_here`), it leaves `result` empty and computes the logits as usual.

    The loss is taken inside the head's own call, after wrappers that gather sharded weights in pre-hooks
    registered before ours (ZeRO-3, FSDP) have made them whole. `shift`: decoder-only, position t predicts
    label t + 1.
    """

    def hook(module: nn.Linear, args: tuple) -> tuple | None:
        hidden = args[0]  # [B, L, D]
        if not _usable_here(module, hidden):
            return None
        aligned_hidden, aligned_labels = align_labels(hidden, labels, shift)
        result["token_losses"] = frozen_head_cross_entropy(aligned_hidden, module.weight, module.bias, aligned_labels)
        return (hidden[:, :0],)  # [B, 0, D]: the LLM's own logits come out empty

    handle = head.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _fusable(llm: nn.Module) -> bool:
    """Whether `llm`'s loss may be taken through its LM head without logits (its weights are checked again at call
    time: `_usable_here`)."""
    return llm.config.model_type in HEAD_IS_LAST_LAYER and head_is_plain_linear(llm.get_output_embeddings())


def language_model_loss(
    llm: nn.Module,
    llm_inputs: dict[str, Any],
    labels: torch.Tensor,
    shift: bool,
    num_items_in_batch: int | torch.Tensor | None,
    fused: bool,
) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """Run `llm` on `llm_inputs` and score `labels`: `(outputs, loss, token_losses)`.

    `fused`: take the loss through the frozen head (where it can, else from the logits) and drop the logits from
    `outputs`, so whether `outputs.logits` is None depends on `fused` alone.
    """
    result: dict[str, torch.Tensor] = {}
    if fused and _fusable(llm):
        with head_loss_instead_of_logits(llm.get_output_embeddings(), labels, shift, result):
            outputs = llm(**llm_inputs, return_dict=True)
    else:
        outputs = llm(**llm_inputs, return_dict=True)
    token_losses = result.get("token_losses")
    if token_losses is None:  # not fused, or the head's weights were not usable in place
        token_losses = token_cross_entropy(outputs.logits, labels, shift)
    if fused:
        outputs.logits = None
    loss = per_item(token_losses.sum(), target_labels(labels, shift), num_items_in_batch)
    return outputs, loss, token_losses.detach()
