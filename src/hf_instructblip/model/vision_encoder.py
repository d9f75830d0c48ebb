"""EVA ViT-g image encoder (LAVIS `visual_encoder` + `ln_vision`), in transformers' key layout.

Pre-norm transformer blocks; attention uses one fused `qkv` projection whose bias is `cat(q_bias, 0, v_bias)`
in the released weights (a key bias would be a per-query constant under softmax, so EVA has none).
`post_layernorm` is LAVIS's `ln_vision`, applied to every token.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .attention import attend
from .configuration import InstructBlipVisionConfig
from .inputs import check_pixel_values
from .pretrained import InstructBlipPreTrainedModel


class EvaEmbeddings(nn.Module):
    """Patchify + class token + learned positions: `[B, 3, H, W]` -> `[B, 1 + (H/p)(W/p), D]`."""

    def __init__(self, config: InstructBlipVisionConfig):
        super().__init__()
        self.patch_size = config.patch_size
        num_positions = (config.image_size // config.patch_size) ** 2 + 1
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.position_embedding = nn.Parameter(torch.zeros(1, num_positions, config.hidden_size))
        self.patch_embedding = nn.Conv2d(3, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size)

    def positions_for(self, height: int, width: int) -> torch.Tensor:
        """Position table for a `height x width` image; bicubic resize of the patch grid when it differs."""
        table = self.position_embedding  # [1, 1 + N, D]
        grid_h, grid_w = height // self.patch_size, width // self.patch_size
        side = int((table.shape[1] - 1) ** 0.5)
        if (grid_h, grid_w) == (side, side):
            return table
        patch_table = table[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)  # [1, D, side, side]
        patch_table = nn.functional.interpolate(
            patch_table.float(), size=(grid_h, grid_w), mode="bicubic", align_corners=False
        ).to(table.dtype)
        return torch.cat([table[:, :1], patch_table.flatten(2).transpose(1, 2)], dim=1)

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        dtype = self.patch_embedding.weight.dtype
        patches = self.patch_embedding(pixel_values.to(dtype)).flatten(2).transpose(1, 2)  # [B, N, D]
        cls = self.class_embedding.to(dtype).expand(patches.shape[0], -1, -1)  # [B, 1, D]
        embeddings = torch.cat([cls, patches], dim=1)
        if interpolate_pos_encoding:
            positions = self.positions_for(*pixel_values.shape[-2:])
        else:
            positions = self.position_embedding
        return embeddings + positions.to(dtype)


class EvaAttention(nn.Module):
    """Bidirectional self-attention with a fused `qkv` projection."""

    is_causal = False

    def __init__(self, config: InstructBlipVisionConfig):
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // self.num_heads
        self.scaling = self.head_dim**-0.5
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.qkv_bias)
        self.projection = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(
        self, hidden_states: torch.Tensor, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, length, _ = hidden_states.shape
        qkv = self.qkv(hidden_states).view(batch, length, 3, self.num_heads, self.head_dim)
        query, key, value = qkv.permute(2, 0, 3, 1, 4)  # each [B, H, L, Dh]
        output, probs = attend(self, query, key, value, None, self.scaling, self.config.attention_dropout,
                               output_attentions)
        return self.projection(output), probs


class EvaMLP(nn.Module):
    def __init__(self, config: InstructBlipVisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(hidden_states)))


class EvaEncoderLayer(GradientCheckpointingLayer):
    """Pre-norm block: `x + attn(ln1(x))`, then `x + mlp(ln2(x))`."""

    def __init__(self, config: InstructBlipVisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = EvaAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = EvaMLP(config)

    def forward(
        self, hidden_states: torch.Tensor, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        attended, probs = self.self_attn(self.layer_norm1(hidden_states), output_attentions)
        hidden_states = hidden_states + attended
        return hidden_states + self.mlp(self.layer_norm2(hidden_states)), probs


class EvaEncoder(nn.Module):
    def __init__(self, config: InstructBlipVisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(EvaEncoderLayer(config) for _ in range(config.num_hidden_layers))


class InstructBlipVisionModel(InstructBlipPreTrainedModel):
    """EVA ViT-g: pixels `[B, 3, H, W]` -> features `[B, 1 + N, D]` (after `post_layernorm` = `ln_vision`).

    Example:
        >>> config = InstructBlipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        ...                                   num_attention_heads=4, image_size=28, patch_size=14)
        >>> model = InstructBlipVisionModel(config)
        >>> model(torch.zeros(1, 3, 28, 28)).last_hidden_state.shape
        torch.Size([1, 5, 32])
    """

    config_class = InstructBlipVisionConfig
    main_input_name = "pixel_values"

    def __init__(self, config: InstructBlipVisionConfig):
        super().__init__(config)
        self.embeddings = EvaEmbeddings(config)
        self.encoder = EvaEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings

    def forward(
        self,
        pixel_values: torch.Tensor,
        interpolate_pos_encoding: bool = False,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        output_attentions: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling | tuple:
        """`last_hidden_state` `[B, 1 + N, D]` after `post_layernorm`; `pooler_output` `[B, D]`: the class token,
        normalised once more (as transformers' BLIP vision models); `hidden_states` (embeddings + every layer) and
        `attentions` (`[B, H, 1 + N, 1 + N]` per layer) on request, by the call or the config."""
        check_pixel_values(pixel_values, self.config.image_size, self.config.patch_size, interpolate_pos_encoding)
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        if output_attentions is None:
            output_attentions = self.config.output_attentions
        hidden_states = self.embeddings(pixel_values, interpolate_pos_encoding)  # [B, 1 + N, D]
        all_hidden_states, all_attentions = [hidden_states], []
        for layer in self.encoder.layers:
            hidden_states, probs = layer(hidden_states, output_attentions)
            all_hidden_states.append(hidden_states)
            all_attentions.append(probs)
        last_hidden_state = self.post_layernorm(hidden_states)
        output = BaseModelOutputWithPooling(
            last_hidden_state=last_hidden_state,
            pooler_output=self.post_layernorm(last_hidden_state[:, 0]),  # [B, D]
            hidden_states=tuple(all_hidden_states) if output_hidden_states else None,
            attentions=tuple(all_attentions) if output_attentions else None,
        )
        return self._returned(output, return_dict)
