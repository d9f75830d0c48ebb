"""Shared `PreTrainedModel` base: weight init and the capabilities every InstructBLIP module declares."""

from __future__ import annotations

from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init

from .configuration import InstructBlipConfig


class InstructBlipPreTrainedModel(PreTrainedModel):
    """Base class of the vision encoder, the Q-Former and the full model."""

    config_class = InstructBlipConfig
    base_model_prefix = "instructblip"
    supports_gradient_checkpointing = True
    _supports_attention_backend = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    # Blocks that must stay on one device under `device_map="auto"` (residual adds inside them).
    _no_split_modules = ["EvaEncoderLayer", "QFormerLayer", "QFormerEmbeddings"]

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)  # Linear / Embedding / LayerNorm from `initializer_range`
        std = getattr(self.config, "initializer_range", 0.02)
        if hasattr(module, "class_embedding"):  # vision embeddings
            init.trunc_normal_(module.class_embedding, mean=0.0, std=std)
            init.trunc_normal_(module.position_embedding, mean=0.0, std=std)
        if isinstance(getattr(module, "query_tokens", None), nn.Parameter):
            init.trunc_normal_(module.query_tokens, mean=0.0, std=std)
