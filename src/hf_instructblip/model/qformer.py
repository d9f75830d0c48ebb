"""Instruction-aware Q-Former (BERT-base with cross-attention to image features), transformers' key layout.

Sequence = `[queries; instruction tokens]`. Self-attention is bidirectional over the whole sequence, so the
instruction steers what the queries extract. Only query positions cross-attend to the image (layers with
`idx % cross_attention_frequency == 0`), and query / text positions go through separate feed-forward nets.
With no instruction (`input_ids=None`) this is BLIP-2's Q-Former.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPoolingAndCrossAttentions

from .attention import attend
from .configuration import InstructBlipQFormerConfig
from .pretrained import InstructBlipPreTrainedModel


class QFormerMultiHeadAttention(nn.Module):
    """Self-attention, or cross-attention whose keys/values come from `encoder_hidden_size`-wide features."""

    is_causal = False

    def __init__(self, config: InstructBlipQFormerConfig, is_cross_attention: bool = False):
        super().__init__()
        self.config = config
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        kv_width = config.encoder_hidden_size if is_cross_attention else config.hidden_size
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(kv_width, config.hidden_size)
        self.value = nn.Linear(kv_width, config.hidden_size)

    def _heads(self, states: torch.Tensor) -> torch.Tensor:
        return states.view(*states.shape[:2], -1, self.head_dim).transpose(1, 2)  # [B, H, L, Dh]

    def forward(
        self, hidden_states: torch.Tensor, context: torch.Tensor, attention_mask: torch.Tensor | None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        query = self._heads(self.query(hidden_states))
        key, value = self._heads(self.key(context)), self._heads(self.value(context))
        return attend(self, query, key, value, attention_mask, self.scaling, self.config.attention_probs_dropout_prob,
                      output_attentions)


class QFormerResidualOutput(nn.Module):
    """`LayerNorm(dropout(dense(x)) + residual)`: the post-norm residual of BERT."""

    def __init__(self, config: InstructBlipQFormerConfig, in_features: int):
        super().__init__()
        self.dense = nn.Linear(in_features, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + residual)


class QFormerAttention(nn.Module):
    def __init__(self, config: InstructBlipQFormerConfig, is_cross_attention: bool = False):
        super().__init__()
        self.attention = QFormerMultiHeadAttention(config, is_cross_attention)
        self.output = QFormerResidualOutput(config, config.hidden_size)

    def forward(
        self, hidden_states: torch.Tensor, context: torch.Tensor, attention_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        attended, probs = self.attention(hidden_states, context, attention_mask, output_attentions)
        return self.output(attended, hidden_states), probs


class QFormerIntermediate(nn.Module):
    def __init__(self, config: InstructBlipQFormerConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACT2FN[config.hidden_act]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(hidden_states))


class QFormerLayer(GradientCheckpointingLayer):
    """Self-attention over `[queries; text]`, cross-attention for queries, one FFN per position kind."""

    def __init__(self, config: InstructBlipQFormerConfig, layer_idx: int):
        super().__init__()
        self.attention = QFormerAttention(config)
        has_cross = layer_idx % config.cross_attention_frequency == 0
        self.crossattention = QFormerAttention(config, is_cross_attention=True) if has_cross else None
        self.intermediate = QFormerIntermediate(config)  # text positions
        self.output = QFormerResidualOutput(config, config.intermediate_size)
        self.intermediate_query = QFormerIntermediate(config)  # query positions
        self.output_query = QFormerResidualOutput(config, config.intermediate_size)

    def forward(
        self,
        hidden_states: torch.Tensor,  # [B, Q + T, D]
        image_embeds: torch.Tensor | None,  # [B, N, D_vision]
        attention_mask: torch.Tensor | None,
        num_queries: int,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """`(hidden_states, self-attention probs, cross-attention probs)`; probs only with `output_attentions`."""
        hidden_states, self_probs = self.attention(hidden_states, hidden_states, attention_mask, output_attentions)
        queries, text = hidden_states[:, :num_queries], hidden_states[:, num_queries:]
        cross_probs = None
        if self.crossattention is not None and num_queries > 0:
            if image_embeds is None:
                raise ValueError("`encoder_hidden_states` (image features) are required by cross-attention layers.")
            # every image token is real: no mask
            queries, cross_probs = self.crossattention(queries, image_embeds, None, output_attentions)
        outputs = []
        if num_queries > 0:
            outputs.append(self.output_query(self.intermediate_query(queries), queries))
        if text.shape[1] > 0:
            outputs.append(self.output(self.intermediate(text), text))
        return torch.cat(outputs, dim=1) if len(outputs) > 1 else outputs[0], self_probs, cross_probs


class QFormerEmbeddings(nn.Module):
    """Word + position embeddings of the instruction, queries prepended, then one LayerNorm over both."""

    def __init__(self, config: InstructBlipQFormerConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor | None, query_embeds: torch.Tensor | None) -> torch.Tensor:
        return self.dropout(embed_queries_and_text(self, self.layernorm, input_ids, query_embeds))


def embed_queries_and_text(
    embeddings: nn.Module, layernorm: nn.LayerNorm, input_ids: torch.Tensor | None, query_embeds: torch.Tensor | None
) -> torch.Tensor:
    """`layernorm([queries; word + position embeddings of input_ids])` `[B, Q + T, D]`: the one place of the rule
    (queries carry no position embedding, text positions start at 0, one LayerNorm over both). `embeddings` holds
    `word_embeddings` and `position_embeddings` (ours: `QFormerEmbeddings`; BLIP-2 stage 1 keeps them apart from the
    LayerNorm, as `pretraining` does)."""
    parts = []
    if query_embeds is not None:
        parts.append(query_embeds)  # [B, Q, D]
    if input_ids is not None:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        parts.append(embeddings.word_embeddings(input_ids) + embeddings.position_embeddings(positions))  # [B, T, D]
    return layernorm(torch.cat(parts, dim=1).to(layernorm.weight.dtype))


class QFormerEncoder(nn.Module):
    def __init__(self, config: InstructBlipQFormerConfig):
        super().__init__()
        self.layer = nn.ModuleList(QFormerLayer(config, idx) for idx in range(config.num_hidden_layers))


class InstructBlipQFormerModel(InstructBlipPreTrainedModel):
    """Q-Former: learned queries (+ instruction) cross-attending to image features.

    Example:
        >>> config = InstructBlipQFormerConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
        ...                                    num_attention_heads=4, intermediate_size=64, encoder_hidden_size=16)
        >>> model = InstructBlipQFormerModel(config)
        >>> out = model(torch.tensor([[5, 6, 7]]), query_embeds=torch.zeros(1, 4, 32),
        ...             encoder_hidden_states=torch.zeros(1, 10, 16))
        >>> out.last_hidden_state.shape  # [B, Q + T, D]
        torch.Size([1, 7, 32])
    """

    config_class = InstructBlipQFormerConfig

    def __init__(self, config: InstructBlipQFormerConfig):
        super().__init__(config)
        self.embeddings = QFormerEmbeddings(config)
        self.encoder = QFormerEncoder(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.embeddings.word_embeddings = value

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        query_embeds: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPoolingAndCrossAttentions | tuple:
        """`attention_mask` covers `[queries; input_ids]` (`[B, Q + T]`, 1 = keep), as in transformers.
        `pooler_output` `[B, D]` is the first position's state; `hidden_states`, `attentions` (self-attention
        `[B, H, Q + T, Q + T]`) and `cross_attentions` (`[B, H, Q, N]`, cross-attention layers only) on request, by
        the call or the config."""
        if input_ids is None and query_embeds is None:
            raise ValueError("InstructBlipQFormerModel needs `input_ids`, `query_embeds`, or both.")
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        if output_attentions is None:
            output_attentions = self.config.output_attentions
        num_queries = 0 if query_embeds is None else query_embeds.shape[1]
        hidden_states = self.embeddings(input_ids, query_embeds)  # [B, Q + T, D]
        if encoder_hidden_states is not None:  # fp16 image features into a Q-Former kept in fp32 (fp16 loading)
            encoder_hidden_states = encoder_hidden_states.to(hidden_states.dtype)
        mask = create_bidirectional_mask(
            config=self.config, inputs_embeds=hidden_states, attention_mask=attention_mask
        )
        all_hidden_states, self_attentions, cross_attentions = [hidden_states], [], []
        for layer in self.encoder.layer:
            hidden_states, self_probs, cross_probs = layer(
                hidden_states, encoder_hidden_states, mask, num_queries, output_attentions
            )
            all_hidden_states.append(hidden_states)
            self_attentions.append(self_probs)
            if cross_probs is not None:
                cross_attentions.append(cross_probs)
        output = BaseModelOutputWithPoolingAndCrossAttentions(
            last_hidden_state=hidden_states,
            pooler_output=hidden_states[:, 0],  # [B, D]
            hidden_states=tuple(all_hidden_states) if output_hidden_states else None,
            attentions=tuple(self_attentions) if output_attentions else None,
            cross_attentions=tuple(cross_attentions) if output_attentions else None,
        )
        return self._returned(output, return_dict)
