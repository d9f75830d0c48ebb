"""Video processor: clips + prompts -> the inputs of `InstructBlipVideoForConditionalGeneration`.

A clip is a list of frames (anything `load_image` reads: PIL images, arrays, tensors, file paths), a `[T, H, W, C]`
array, a `[T, C, H, W]` tensor, or a folder of frame images (sorted by name, numbers compared as numbers). Each clip
is sampled uniformly to `num_frames` frames (default 4, the paper's setting); each frame goes through the BLIP image
processor, giving `pixel_values` `[B, T, 3, H, W]`; each prompt gets `T * num_query_tokens` placeholders in front.
Every clip of a batch has T frames (one tensor, one placeholder count): clips with more frames are sampled down,
clips with fewer are refused unless `pad_frames=True`, which repeats frames in time order.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import AutoProcessor, BatchFeature

from .configuration_video import InstructBlipVideoConfig
from .images import load_image
from .layout import prepend_image_placeholders
from .processing import IMAGE_KWARGS, QFORMER_MAX_LENGTH, HfInstructBlipProcessor, as_texts, check_options
from .validation import check_int

DEFAULT_NUM_FRAMES = 4  # frames per clip in the paper's video QA evaluation
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")


def uniform_indices(total: int, frames: int) -> list[int]:
    """`frames` indices spread evenly over `total` frames: the first frame of each of `frames` equal segments (as
    `np.arange(0, total, total / frames).astype(int)`); with `total < frames`, each frame repeats in time order.

    Example:
        >>> uniform_indices(10, 4), uniform_indices(2, 4)
        ([0, 2, 5, 7], [0, 0, 1, 1])
    """
    return [i * total // frames for i in range(frames)]


def list_frames(folder: str | os.PathLike, where: str = "video") -> list[Path]:
    """The frame images of a folder in time order: sorted by name, digit runs compared as numbers (2 before 10).

    Example:
        >>> [p.name for p in list_frames("clip/")]
        ['frame_1.png', 'frame_2.png', 'frame_10.png']
    """
    folder = Path(folder)
    frames = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in FRAME_SUFFIXES]
    if not frames:
        raise ValueError(f"`{where}`: the folder {str(folder)!r} holds no frame images ({', '.join(FRAME_SUFFIXES)}); "
                         "decode the video to frames first.")
    return sorted(frames, key=lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)])


def _is_clip(value: Any) -> bool:
    """Whether `value` is one clip (not one frame): a list, a 4-D array / tensor or a folder."""
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return value.ndim == 4
    return isinstance(value, (list, tuple)) or (isinstance(value, (str, os.PathLike)) and os.path.isdir(value))


def as_clips(videos: Any) -> list[Any]:
    """One clip or a batch of clips -> a list of clips (a 5-D array / tensor is a batch)."""
    if isinstance(videos, (np.ndarray, torch.Tensor)) and videos.ndim == 5:
        return list(videos)
    if isinstance(videos, (list, tuple)) and videos and _is_clip(videos[0]):
        return list(videos)
    if _is_clip(videos):
        return [videos]
    found = list(videos.shape) if isinstance(videos, (np.ndarray, torch.Tensor)) else type(videos).__name__
    raise ValueError("`videos` must be a clip (a list of frames, a [T, H, W, C] array, a [T, C, H, W] tensor or a "
                     f"folder of frames) or a list of clips, found {found}.")


def load_clip(clip: Any, num_frames: int | None, pad_frames: bool, where: str) -> list[Image.Image]:
    """One clip -> `num_frames` RGB frames sampled uniformly (all of them with `num_frames=None`), one size."""
    items = list_frames(clip, where) if isinstance(clip, (str, os.PathLike)) else list(clip)
    if not items:
        raise ValueError(f"`{where}` holds no frames; a clip needs at least one.")
    if num_frames is not None:
        if len(items) < num_frames and not pad_frames:
            raise ValueError(f"`{where}` has {len(items)} frames, fewer than num_frames={num_frames}; pass "
                             f"`pad_frames=True` to repeat frames, or a smaller `num_frames`.")
        items = [items[i] for i in uniform_indices(len(items), num_frames)]
    frames = [load_image(item, where=f"{where}[{i}]") for i, item in enumerate(items)]
    sizes = {i: frame.size for i, frame in enumerate(frames)}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"`{where}`: the frames of a clip must share one size, found (frame: (width, height)) "
                         f"{sizes}.")
    return frames


class HfInstructBlipVideoProcessor(HfInstructBlipProcessor):
    """Video clips, prompts and Q-Former instructions -> `InstructBlipVideoForConditionalGeneration` inputs.

    The image processor's components and files, plus `num_frames` (frames sampled per clip, default 4) and
    `pad_frames` (repeat frames of shorter clips instead of refusing them). `images=` is accepted as another name
    for `videos=`, as in transformers' InstructBlipVideoProcessor. Exported as `InstructBlipVideoProcessor`.

    Example:
        >>> processor = InstructBlipVideoProcessor.from_pretrained("Salesforce/instructblip-vicuna-7b")
        >>> inputs = processor(videos=[clip_a, clip_b], text=["What happens?", "Who is there?"], return_tensors="pt")
        >>> inputs["pixel_values"].shape  # [2, 4, 3, 224, 224]
    """

    def __init__(self, image_processor, tokenizer, qformer_tokenizer, num_query_tokens: int = 32,
                 image_token: str | None = None, qformer_max_length: int = QFORMER_MAX_LENGTH,
                 num_frames: int | None = DEFAULT_NUM_FRAMES, pad_frames: bool = False, **kwargs):
        # Every setting is named here: `save_pretrained` writes the `__init__` parameters it finds as attributes.
        check_int("num_frames", num_frames, allow_none=True)
        self.num_frames, self.pad_frames = num_frames, bool(pad_frames)
        super().__init__(image_processor, tokenizer, qformer_tokenizer, num_query_tokens=num_query_tokens,
                         image_token=image_token, qformer_max_length=qformer_max_length, **kwargs)

    def load_clips(self, videos: Any, num_frames: int | None = None, pad_frames: bool | None = None
                   ) -> list[list[Image.Image]]:
        """Clips in any accepted form -> lists of RGB frames, all of one length (checked)."""
        num_frames = self.num_frames if num_frames is None else check_int("num_frames", num_frames, allow_none=True)
        pad_frames = self.pad_frames if pad_frames is None else pad_frames
        clips = [load_clip(clip, num_frames, pad_frames, f"videos[{i}]") for i, clip in enumerate(as_clips(videos))]
        counts = {i: len(clip) for i, clip in enumerate(clips)}
        if len(set(counts.values())) > 1:
            raise ValueError(f"`videos`: every clip of a batch needs the same number of frames, found (clip: frames) "
                             f"{counts}; pass `num_frames` to sample them to one count.")
        return clips

    def preprocess_videos(self, videos: Any, num_frames: int | None = None, pad_frames: bool | None = None,
                          return_tensors: str | None = "pt", **images_kwargs) -> Any:
        """Clips -> `pixel_values` `[B, T, 3, H, W]` (as the collator needs them)."""
        clips = self.load_clips(videos, num_frames, pad_frames)
        check_options(images_kwargs)
        pixels = self._clip_pixels(clips, images_kwargs)
        return BatchFeature({"pixel_values": pixels}, tensor_type=return_tensors)["pixel_values"]

    def _clip_pixels(self, clips: list[list[Image.Image]], images_kwargs: dict) -> np.ndarray:
        flat = [frame for clip in clips for frame in clip]
        pixels = self._pixel_values(flat, "np", images_kwargs)  # [B*T, 3, H, W], each frame as an image
        return pixels.reshape(len(clips), len(clips[0]), *pixels.shape[1:])  # [B, T, 3, H, W]

    def __call__(self, videos: Any = None, text: str | list[str] | None = None, *, images: Any = None,
                 num_frames: int | None = None, pad_frames: bool | None = None, max_length: int | None = None,
                 return_tensors: str | None = None, images_kwargs: dict[str, Any] | None = None,
                 **kwargs) -> BatchFeature:
        """Clips and/or prompts -> `pixel_values` `[B, T, 3, H, W]`, `input_ids` / `attention_mask` (T * Q
        placeholders first), `qformer_input_ids` / `qformer_attention_mask`. One clip may serve every prompt;
        otherwise clips and prompts pair up. Text options are the image processor's (`padding`, `max_length`, ...)."""
        if images is not None and videos is not None:
            raise ValueError("Pass the clips as `videos` or as `images`, not both.")
        videos = images if videos is None else videos
        frame_kwargs = {**(images_kwargs or {}), **{k: kwargs.pop(k) for k in list(kwargs) if k in IMAGE_KWARGS}}
        if videos is None:  # prompts only: the image processor's text path
            return super().__call__(text=text, max_length=max_length, return_tensors=return_tensors, **kwargs)
        clips = self.load_clips(videos, num_frames, pad_frames)
        encoding: dict[str, Any] = {}
        if text is not None:
            texts = as_texts(text)
            clips = _pair_clips(clips, len(texts))
            placeholders = len(clips[0]) * self.num_query_tokens  # T * Q
            if max_length is not None and max_length <= placeholders:
                raise ValueError(f"`max_length` counts the {placeholders} video placeholders (frames x "
                                 f"num_query_tokens) and must exceed them, found {max_length}.")
            text_only = super().__call__(text=texts, max_length=max_length and max_length - placeholders, **kwargs)
            encoding.update(text_only)
            for key, fill in (("input_ids", self.image_token_id), ("attention_mask", 1)):
                encoding[key] = prepend_image_placeholders(encoding[key], fill, placeholders)  # [B, T*Q + L]
        check_options(frame_kwargs)
        encoding["pixel_values"] = self._clip_pixels(clips, frame_kwargs)
        return BatchFeature(encoding, tensor_type=return_tensors)


InstructBlipVideoProcessor = HfInstructBlipVideoProcessor  # the drop-in name




def _pair_clips(clips: list, num_texts: int) -> list:
    """One clip per prompt; a single clip is shared by every prompt."""
    if len(clips) in (1, num_texts):
        return clips * num_texts if len(clips) == 1 else clips
    raise ValueError(f"Got {len(clips)} clips in `videos` for {num_texts} prompts in `text`: pass one clip per prompt, "
                     "or one clip for all.")


# `AutoProcessor.from_pretrained(folder)` -> this class for our video folders; saves carry `auto_map` + code.
AutoProcessor.register(InstructBlipVideoConfig, HfInstructBlipVideoProcessor, exist_ok=True)
HfInstructBlipVideoProcessor.register_for_auto_class()
