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
    """Plain softmax attention; `attention_mask` is additive `[B, 1, Lq, Lk]` or None."""
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling  # [B, H, Lq, Lk]
    if attention_mask is not None:
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
) -> torch.Tensor:
    """Run the configured attention kernel and merge heads: `[B, H, L, Dh]` -> `[B, L, H * Dh]`."""
    implementation = module.config._attn_implementation or "eager"
    kernel = eager_attention if implementation == "eager" else ALL_ATTENTION_FUNCTIONS[implementation]
    output, _ = kernel(
        module, query, key, value, attention_mask,
        scaling=scaling, dropout=dropout if module.training else 0.0,
    )
    return output.reshape(*output.shape[:2], -1)
