"""Video InstructBLIP, as the paper evaluates it (MSVD-QA, MSRVTT-QA, iVQA): every frame goes through the vision
encoder and the instruction-aware Q-Former on its own, and the frames' K query outputs, in time order, are the
LLM's visual prompt: T x K soft tokens.

Only the image -> feature step changes; placeholders, loss, generation and ranking are the image model's, which
check that every prompt row holds as many placeholders as there are visual tokens (T x K here).
"""

from __future__ import annotations

import torch

from .configuration_video import InstructBlipVideoConfig
from .modeling import InstructBlipForConditionalGeneration
from .outputs import InstructBlipImageFeatures


# One frame's dimensions, by argument: clips add [batch, frames] in front.
_FRAME_DIMS = {"pixel_values": "3, height, width", "image_embeds": "tokens, vision width"}


def _clip_shape(clips: torch.Tensor, name: str) -> tuple[int, int]:
    """`(batch, frames)` of `[B, T, ...]` clips given as argument `name`, checked."""
    dims = f"batch, frames, {_FRAME_DIMS[name]}"
    if not isinstance(clips, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor [{dims}], found {type(clips).__name__}.")
    if clips.dim() != len(dims.split(", ")):
        hint = " (a batch of images? one image is a one-frame clip: `.unsqueeze(1)`)" if clips.dim() == 4 else ""
        raise ValueError(f"`{name}` must have shape [{dims}], found {list(clips.shape)}{hint}.")
    if clips.shape[1] < 1:
        raise ValueError(f"`{name}` holds clips of 0 frames (shape {list(clips.shape)}); a clip needs a frame.")
    return clips.shape[0], clips.shape[1]


class InstructBlipVideoForConditionalGeneration(InstructBlipForConditionalGeneration):
    """InstructBLIP over video clips: `pixel_values` `[B, T, 3, H, W]`, `T * num_query_tokens` placeholders per prompt.

    Same weights as the image model (it loads the official image checkpoints and transformers' InstructBlipVideo
    folders unchanged); T = 1 is the image model on that frame.

    Example:
        >>> from hf_instructblip import InstructBlipVideoForConditionalGeneration, InstructBlipVideoProcessor
        >>> model = InstructBlipVideoForConditionalGeneration.from_pretrained("Salesforce/instructblip-flan-t5-xl")
        >>> processor = InstructBlipVideoProcessor.from_pretrained("Salesforce/instructblip-flan-t5-xl")
        >>> inputs = processor(videos=frames, text="What is happening?", return_tensors="pt")  # 4 frames sampled
        >>> processor.batch_decode(model.generate(**inputs), skip_special_tokens=True)
    """

    config_class = InstructBlipVideoConfig

    def get_image_features(
        self,
        pixel_values: torch.Tensor | None = None,
        qformer_input_ids: torch.Tensor | None = None,
        qformer_attention_mask: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        image_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> InstructBlipImageFeatures:
        """Clips `[B, T, 3, H, W]` (+ one instruction per clip) -> `pooler_output` `[B, T*Q, D_llm]`, frame by frame in
        time order. `image_embeds` `[B, T, N, D_vision]` (vision features) replace `pixel_values` when given. The
        encoders' outputs come back per frame (`[B*T, ...]`)."""
        if image_embeds is not None:
            batch, frames = _clip_shape(image_embeds, "image_embeds")
        else:
            if pixel_values is None:
                raise ValueError("`pixel_values` is required (or precomputed vision features as `image_embeds`).")
            batch, frames = _clip_shape(pixel_values, "pixel_values")
        qformer_input_ids = self._per_frame(qformer_input_ids, "qformer_input_ids", batch, frames)
        qformer_attention_mask = self._per_frame(qformer_attention_mask, "qformer_attention_mask", batch, frames)
        return_dict = kwargs.pop("return_dict", None)
        features = super().get_image_features(
            pixel_values.flatten(0, 1) if image_embeds is None else None,  # [B*T, 3, H, W]
            qformer_input_ids, qformer_attention_mask, interpolate_pos_encoding,
            image_embeds.flatten(0, 1) if image_embeds is not None else None,  # [B*T, N, D_vision]
            return_dict=True, **kwargs,
        )
        per_frame = features.pooler_output  # [B*T, Q, D_llm]
        # [B, T*Q, D_llm]: frame 0's queries, then frame 1's, ...
        features.pooler_output = per_frame.reshape(batch, frames * per_frame.shape[1], per_frame.shape[-1])
        return self._returned(features, return_dict)

    def _per_frame(self, rows: torch.Tensor | None, name: str, batch: int, frames: int) -> torch.Tensor | None:
        """One Q-Former instruction row per clip `[B, L]` -> the same row for each of its frames `[B*T, L]`."""
        if rows is None or not self.config.instruction_aware:
            return rows
        if not isinstance(rows, torch.Tensor) or rows.dim() != 2 or rows.shape[0] != batch:
            found = list(rows.shape) if isinstance(rows, torch.Tensor) else type(rows).__name__
            raise ValueError(f"`{name}` must have shape [{batch}, length] (one instruction per clip), found {found}.")
        return rows.repeat_interleave(frames, dim=0)

    def _visual_tokens(self, clips: torch.Tensor, name: str) -> int:
        """Placeholders per prompt: `T * num_query_tokens` for clips of T frames (the caption prompt's count)."""
        return _clip_shape(clips, name)[1] * self.config.num_query_tokens
