"""The one image loader: anything a user holds -> an RGB PIL image, the same way for inference, training and
evaluation (the processor, the collator, the mixture and the evaluation runner all call `load_image`).

Accepted: PIL images in any mode (transparency composited onto white, as transformers' `convert_to_rgb`), a
file path (relative to `root`), `datasets` `Image(decode=False)` rows (`{"bytes", "path"}`), raw bytes, and numpy
arrays / torch tensors (HW, HWC or CHW; uint8 0-255, uint16 0-65535 or float 0-1).
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

_CHANNEL_COUNTS = (1, 3, 4)  # grey, RGB, RGBA


def _rgb(image: Image.Image, where: str) -> Image.Image:
    """Any PIL mode -> RGB; transparency is composited onto white; 16-bit and float modes go through the
    array path, so their values are scaled (or refused) exactly as the same values in an array would be."""
    if image.mode == "RGB":
        return image
    if image.mode == "F":
        return _array_to_pil(np.asarray(image, dtype=np.float32), False, where)
    if image.mode.startswith("I;16"):  # 16-bit grey: 0..65535, scaled as a uint16 array is
        return _array_to_pil(np.asarray(image).astype(np.uint16), False, where)
    if image.mode == "I":
        raise TypeError(f"`{where}` is a 32-bit integer PIL image (mode 'I'), whose value range is unknown; "
                        "convert it to uint8 (0-255) or to a float array in [0, 1] first.")
    if "A" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def _channels_last(array: np.ndarray, channels_first: bool, where: str) -> np.ndarray:
    """`[H, W]`, `[H, W, C]` or `[C, H, W]` (C in 1, 3, 4) -> `[H, W, C]`; `channels_first` breaks ties."""
    if array.ndim == 2:
        return array[:, :, None]
    if array.ndim != 3:
        raise ValueError(f"`{where}` must have 2 or 3 dimensions (HW, HWC or CHW), found shape {list(array.shape)}.")
    first, last = array.shape[0] in _CHANNEL_COUNTS, array.shape[-1] in _CHANNEL_COUNTS
    if first and (channels_first or not last):
        return np.moveaxis(array, 0, -1)
    if last:
        return array
    raise ValueError(
        f"`{where}` must hold 1, 3 or 4 channels first (CHW) or last (HWC), found shape {list(array.shape)}."
    )


def _array_to_pil(array: np.ndarray, channels_first: bool, where: str) -> Image.Image:
    """uint8 (0-255) or float (0-1) array -> RGB PIL image. Floats are quantised to 8 bits, which is also what
    transformers' PIL backend does when it resizes them."""
    hwc = _channels_last(array, channels_first, where)
    if hwc.dtype == np.uint8:
        pixels = hwc
    elif hwc.dtype == np.uint16:  # 16-bit images (PNG, TIFF): 0..65535 onto 0..255
        pixels = np.round(hwc.astype(np.float32) * (255.0 / 65535.0)).astype(np.uint8)
    elif np.issubdtype(hwc.dtype, np.floating):
        if hwc.size and not np.isfinite(hwc).all():
            raise ValueError(f"Float image `{where}` holds NaN or infinite values; expected values in [0, 1].")
        low, high = (float(hwc.min()), float(hwc.max())) if hwc.size else (0.0, 0.0)
        if low < 0.0 or high > 1.0:
            raise ValueError(
                f"Float image `{where}` must hold values in [0, 1], found [{low:.3g}, {high:.3g}]; "
                "pass uint8 for 0-255 pixel values."
            )
        pixels = np.round(hwc * 255.0).astype(np.uint8)
    else:
        raise TypeError(f"`{where}` must be uint8, uint16 or float, found dtype {hwc.dtype}.")
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[pixels.shape[-1]]
    return _rgb(Image.fromarray(pixels[:, :, 0] if mode == "L" else np.ascontiguousarray(pixels), mode=mode), where)


def _open(source: Any, where: str, what: str | None = None) -> Image.Image:
    """Read an image file (path or file object) now, so no file handle outlives the call; `what` names the
    source in errors (default its repr)."""
    try:
        with Image.open(source) as opened:
            return opened.copy()  # loaded, and independent of the file
    except (OSError, SyntaxError) as error:  # PIL raises UnidentifiedImageError (an OSError) for non-images
        described = repr(source) if what is None else what
        raise ValueError(f"`{where}`: cannot read an image from {described} (expected an image file's bytes: "
                         f"{error}).") from None


def _undecoded_source(image: Mapping, where: str) -> bytes | str | os.PathLike:
    """What a `datasets.Image(decode=False)` row holds: its bytes when embedded, else its path (bytes may be None
    or empty, as in rows of local image files)."""
    data, path = image.get("bytes"), image.get("path")
    if data is not None and not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"`{where}` is a {{'bytes', 'path'}} image dict whose 'bytes' must be bytes or None, "
                        f"found {type(data).__name__}.")
    if data:
        return bytes(data)
    if path is not None and not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"`{where}` is a {{'bytes', 'path'}} image dict whose 'path' must be a str or None, "
                        f"found {type(path).__name__}.")
    if path:
        return path
    raise ValueError(f"`{where}` is an image dict without an image: expected non-empty 'bytes' or a 'path' "
                     f"(a `datasets.Image(decode=False)` row), found {_describe_dict(image)}.")


def _describe_dict(image: Mapping) -> str:
    """Keys and value types of a dict, for error messages (never its bytes)."""
    return "{" + ", ".join(f"{key!r}: {type(value).__name__}" for key, value in image.items()) + "}"


def load_image(image: Any, root: str | os.PathLike | None = None, where: str = "image") -> Image.Image:
    """One image in any accepted form -> a non-empty RGB PIL image.

    A `{"bytes", "path"}` dict (a `datasets.Image(decode=False)` row) is read from its bytes when it has any, else
    from its path (relative to `root`).

    Example:
        >>> load_image(np.zeros((8, 8, 3), dtype=np.uint8)).size
        (8, 8)
    """
    if isinstance(image, Mapping):
        image = _undecoded_source(image, where)
    if isinstance(image, (bytes, bytearray)):
        pil = _open(io.BytesIO(image), where, f"{len(image)} bytes")
    elif isinstance(image, (str, os.PathLike)):
        path = Path(root, image) if root is not None else Path(image)
        if not path.is_file():
            raise ValueError(f"`{where}`: image file not found: {path}")
        pil = _open(path, where)
    elif isinstance(image, Image.Image):
        pil = image
    elif isinstance(image, torch.Tensor):
        pil = _array_to_pil(image.detach().cpu().numpy(), channels_first=True, where=where)
    elif isinstance(image, np.ndarray):
        pil = _array_to_pil(image, channels_first=False, where=where)
    else:
        raise TypeError(f"`{where}` must be a PIL image, a numpy array, a torch tensor, a file path, bytes or a "
                        f"{{'bytes', 'path'}} dict, found {type(image).__name__}.")
    if pil.width == 0 or pil.height == 0:
        raise ValueError(f"`{where}` is empty: found a {pil.width}x{pil.height} image.")
    return _rgb(pil, where)


def to_rgb_images(images: Any) -> list[Image.Image]:
    """One image, a list of images or a batch array/tensor `[B, ...]` -> a list of RGB PIL images.

    Example:
        >>> to_rgb_images(np.zeros((2, 3, 8, 8), dtype=np.float32))[0].size
        (8, 8)
    """
    batched_array = isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4
    if batched_array or isinstance(images, (list, tuple)):
        items = list(images)
    else:
        items = [images]
    if not items:
        raise ValueError("`images` is empty: pass at least one image.")
    for i, item in enumerate(items):  # one list per example, as TRL and pipelines pass them
        if isinstance(item, (list, tuple)):
            if len(item) != 1:
                raise ValueError(f"`images[{i}]` holds {len(item)} images; InstructBLIP reads one image per prompt "
                                 "(for frames of a clip, use the video model and processor).")
            items[i] = item[0]
    return [load_image(image, where=f"images[{i}]") for i, image in enumerate(items)]
