"""Scaled dot-product attention routed through transformers' attention-function registry.

`config._attn_implementation` picks the kernel (eager / sdpa / flash / flex); eager is ours. Inputs are
`[B, H, L, Dh]`; outputs come back `[B, L, H, Dh]` as the registry's kernels return them.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS


def eager_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain softmax attention; `attention_mask` `[B, 1, Lq, Lk]` is additive, boolean (True = attend; the sdpa
    layout, met when a call asks for probabilities on an sdpa model) or None."""
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling  # [B, H, Lq, Lk]
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
    elif attention_mask is not None:
        scores = scores + attention_mask
    probs = nn.functional.softmax(scores, dim=-1)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs  # [B, Lq, H, Dh]


def attend(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float,
    output_attentions: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run the configured attention kernel and merge heads: `[B, H, L, Dh]` -> `([B, L, H * Dh], probs | None)`.

    With `output_attentions` the call runs the eager kernel, the one that forms the probabilities `[B, H, Lq, Lk]`
    (fused kernels never materialise them); the output is the same attention.
    """
    implementation = module.config._attn_implementation or "eager"
    eager = output_attentions or implementation == "eager"
    kernel = eager_attention if eager else ALL_ATTENTION_FUNCTIONS[implementation]
    output, probs = kernel(
        module, query, key, value, attention_mask,
        scaling=scaling, dropout=dropout if module.training else 0.0,
    )
    return output.reshape(*output.shape[:2], -1), probs if output_attentions else None
