"""The image side of InstructBLIP: pixels -> EVA ViT -> instruction-aware Q-Former -> `language_projection`, i.e.
the image features in LLM space that the bridge (`modeling.InstructBlipModel.prepare_llm_inputs`) puts in place of
the placeholders."""

from __future__ import annotations

import torch
from transformers.modeling_outputs import BaseModelOutput

from .inputs import check_qformer_length
from .outputs import InstructBlipImageFeatures


class ImageFeaturesMixin:
    """`get_image_features` for a model holding `vision_model`, `query_tokens`, `qformer` and `language_projection`
    (`InstructBlipModel` and its subclasses; the video model runs it per frame).

    Example:
        >>> model.get_image_features(pixel_values, qformer_input_ids).pooler_output.shape  # [B, Q, D_llm]
    """

    def get_image_features(
        self,
        pixel_values: torch.Tensor | None = None,
        qformer_input_ids: torch.Tensor | None = None,
        qformer_attention_mask: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        image_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> InstructBlipImageFeatures:
        """Images (+ instruction for the Q-Former) -> `pooler_output` `[B, Q, D_llm]`. `image_embeds` `[B, N, D_vision]`
        (the vision encoder's `last_hidden_state`, e.g. from a feature cache) replace `pixel_values` when given.
        `output_attentions` / `output_hidden_states` reach the vision encoder and the Q-Former."""
        recorded = {key: kwargs[key] for key in ("output_attentions", "output_hidden_states") if key in kwargs}
        vision_outputs = self._vision_outputs(pixel_values, interpolate_pos_encoding, image_embeds, **recorded)
        image_embeds = vision_outputs.last_hidden_state  # [B, N, D_vision]
        batch = image_embeds.shape[0]
        queries = self.query_tokens.expand(batch, -1, -1)  # [B, Q, D_qformer]
        input_ids, mask = self._qformer_text(qformer_input_ids, qformer_attention_mask, batch)
        if mask is not None:
            query_mask = torch.ones(queries.shape[:2], dtype=mask.dtype, device=mask.device)
            mask = torch.cat([query_mask, mask], dim=1)  # [B, Q + T]
        qformer_outputs = self.qformer(
            input_ids=input_ids, attention_mask=mask, query_embeds=queries, encoder_hidden_states=image_embeds,
            return_dict=True, **recorded,
        )
        query_output = qformer_outputs.last_hidden_state[:, : queries.shape[1]]  # [B, Q, D_qformer]
        features = InstructBlipImageFeatures(
            last_hidden_state=image_embeds,
            pooler_output=self.language_projection(query_output),  # [B, Q, D_llm]
            hidden_states=vision_outputs.hidden_states,
            attentions=vision_outputs.attentions,
            vision_outputs=vision_outputs,
            qformer_outputs=qformer_outputs,
        )
        return self._returned(features, kwargs.get("return_dict"))

    def _vision_outputs(
        self, pixel_values: torch.Tensor | None, interpolate_pos_encoding: bool, image_embeds: torch.Tensor | None,
        **recorded: bool,
    ) -> BaseModelOutput:
        """The vision encoder's outputs for `pixel_values`, or `image_embeds` passed in their place."""
        if image_embeds is None:
            if pixel_values is None:
                raise ValueError("`pixel_values` is required (or precomputed vision features as `image_embeds`).")
            return self.vision_model(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, return_dict=True,
                                     **recorded)
        expected = self.config.vision_config.hidden_size
        if not isinstance(image_embeds, torch.Tensor) or image_embeds.dim() != 3 or image_embeds.shape[-1] != expected:
            found = list(image_embeds.shape) if isinstance(image_embeds, torch.Tensor) else type(image_embeds).__name__
            raise ValueError(f"`image_embeds` must be the vision encoder's features [batch, tokens, {expected}], "
                             f"found {found}.")
        return BaseModelOutput(last_hidden_state=image_embeds.to(self.vision_model.dtype))

    def _qformer_text(
        self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None, batch: int
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The instruction the Q-Former reads: required when instruction-aware, dropped otherwise (BLIP-2)."""
        if not self.config.instruction_aware:
            return None, None
        if input_ids is None:
            raise ValueError(
                "`qformer_input_ids` is required: this model is instruction-aware (config.instruction_aware=True) "
                "and its Q-Former reads the instruction. Pass the processor's `qformer_input_ids`."
            )
        if input_ids.dim() != 2 or input_ids.shape[0] != batch:
            raise ValueError(f"`qformer_input_ids` must have shape [{batch}, length] (one row per image), found "
                             f"{list(input_ids.shape)}.")
        check_qformer_length(input_ids, self.config.qformer_config)  # `get_image_features` is public
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return input_ids, attention_mask
