"""`base_model` of the full model for fused LM heads (TRL, Liger): the model up to the LLM's last hidden states."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class LanguageBody:
    """Calling it runs the base model's forward (`InstructBlipModel.forward`) on the full model's own modules, the
    LLM without its head, as TRL's and Liger's fused heads do before applying the head themselves. Not a module of
    its own, so the state dict keeps the full model's layout.

    Example:
        >>> model.base_model(**inputs).last_hidden_state.shape  # [B, L, D_llm]; model.lm_head is applied by the caller
    """

    _tp_plan = None
    _pp_plan = None

    def __init__(self, model: Any, forward: Callable[..., Any]):
        self._model = model
        self._forward = forward  # the base model's forward, bound to the full model

    def __call__(self, *args, **kwargs) -> Any:
        if not self._model.config.use_decoder_only_language_model:
            # Fused heads score position t against label t + 1 and apply the head to these states as they are:
            # wrong for T5, whose decoder position t predicts label t (and whose tied head rescales them first).
            raise ValueError(
                "To train an encoder-decoder LLM with TRL, use hf_instructblip.InstructBlipSFTTrainer (it takes the "
                "model's own loss): plain trl.SFTTrainer's fused LM head, which calls the full model's `base_model`, "
                "serves decoder-only LLMs only. For the decoder's hidden states use InstructBlipModel."
            )
        return self._forward(*args, **kwargs)

    def get_image_features(self, *args, **kwargs) -> Any:
        return self._model.get_image_features(*args, **kwargs)
