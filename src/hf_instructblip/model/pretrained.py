"""Shared `PreTrainedModel` base: weight init and the capabilities every InstructBLIP module declares."""

from __future__ import annotations

from torch import nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput
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

    _can_compile_fullgraph = True  # value checks step aside under tracing (inputs.reads_values)

    def _returned(self, output: ModelOutput, return_dict: bool | None) -> ModelOutput | tuple:
        """`output`, or its tuple when the call's `return_dict` (else the config's) is False, as in transformers."""
        wanted = getattr(self.config, "return_dict", True) if return_dict is None else return_dict
        return output if wanted is not False else output.to_tuple()

    @classmethod
    def _can_set_attn_implementation(cls) -> bool:
        """`set_attn_implementation` may switch every part: our attention layers read `config._attn_implementation`
        at call time (`attention.attend`), which transformers' source heuristic cannot see."""
        return True

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)  # Linear / Embedding / LayerNorm from `initializer_range`
        std = getattr(self.config, "initializer_range", 0.02)
        if hasattr(module, "class_embedding"):  # vision embeddings
            init.trunc_normal_(module.class_embedding, mean=0.0, std=std)
            init.trunc_normal_(module.position_embedding, mean=0.0, std=std)
        if isinstance(getattr(module, "query_tokens", None), nn.Parameter):
            init.trunc_normal_(module.query_tokens, mean=0.0, std=std)
