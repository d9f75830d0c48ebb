"""What the models return: image features, the base model's hidden states, the full model's loss and logits."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.modeling_outputs import BaseModelOutput, BaseModelOutputWithPooling
from transformers.utils import ModelOutput


@dataclass
class InstructBlipImageFeatures(BaseModelOutputWithPooling):
    """As transformers 5's `get_image_features`: `pooler_output` holds the image features in LLM space `[B, Q, D_llm]`,
    `last_hidden_state` / `hidden_states` the vision encoder's; both encoders' outputs come alongside."""

    vision_outputs: ModelOutput | None = None
    qformer_outputs: ModelOutput | None = None


@dataclass
class InstructBlipForConditionalGenerationModelOutput(ModelOutput):
    """With `labels`: `loss` and `token_losses` (detached float32 cross-entropy per label position `[B, N]`, 0 where
    unlabelled; decoder-only: position t scores label t + 1, `N = L - 1`). `logits` is None exactly when the call
    asked for `fused_head_loss=True` with `labels`; otherwise it holds the LLM's logits."""

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    token_losses: torch.FloatTensor | None = None
    vision_outputs: BaseModelOutput | None = None
    qformer_outputs: BaseModelOutput | None = None
    language_model_outputs: ModelOutput | None = None


@dataclass
class InstructBlipModelOutput(ModelOutput):
    """`last_hidden_state` `[B, L, D_llm]`: the LLM body's last hidden states (its decoder's for an encoder-decoder
    LLM), what a fused LM head (TRL, Liger) reads; the three parts' own outputs (the LLM's with its cache) come
    alongside."""

    last_hidden_state: torch.FloatTensor | None = None
    vision_outputs: BaseModelOutput | None = None
    qformer_outputs: BaseModelOutput | None = None
    language_model_outputs: ModelOutput | None = None
