"""What lmms-eval hands a model and how the `hf_instructblip` plugin reads it: requests' arguments, generation
settings and stop strings, batching by length, model-args values, several images. Plain functions, importable
without lmms-eval (tested on their own); `lmms_eval_model` is the plugin that uses them."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from PIL import Image
from transformers import GenerationConfig

from ..model.validation import check_int

# Settings that act only when sampling: dropped for greedy / beam search, where transformers would warn about them.
SAMPLING_ONLY = ("temperature", "top_p", "top_k", "typical_p", "min_p", "epsilon_cutoff", "eta_cutoff")


def generation_settings(
    gen_kwargs: Mapping[str, Any] | None, warn: Callable[[str, str], None] | None = None
) -> tuple[dict[str, Any], list[str]]:
    """A task's `generation_kwargs` -> (`generate` keywords, stop strings).

    As lmms-eval's models read them: `until` (a string or a list) are stop strings; `temperature` 0 means greedy
    and a positive one means sampling unless `do_sample` says otherwise; None values mean "not set". Settings that
    only act when sampling are dropped otherwise. Keys that are no generation setting (e.g. "image_aspect_ratio", for
    other models) are dropped, with a warning.

    Example:
        >>> generation_settings({"until": "\\n", "temperature": 0, "top_p": None, "max_new_tokens": 16})
        ({'max_new_tokens': 16, 'do_sample': False}, ['\\n'])
    """
    settings = {k: v for k, v in dict(gen_kwargs or {}).items() if v is not None}
    until = settings.pop("until", [])
    if isinstance(until, str):
        until = [until]
    if not isinstance(until, (list, tuple)) or not all(isinstance(u, str) for u in until):
        raise TypeError(f"`until` in generation_kwargs must be a string or a list of strings, found {until!r}.")
    known = GenerationConfig().to_dict()
    for key in [k for k in settings if k not in known]:
        if warn is not None:
            warn(f"gen:{key}", f"generation_kwargs[{key!r}] is no transformers generation setting; ignored.")
        del settings[key]
    temperature = settings.get("temperature")
    if "do_sample" not in settings and temperature is not None:
        settings["do_sample"] = temperature > 0
    if temperature == 0:  # lmms-eval's way of saying greedy, whatever `do_sample` says
        settings["do_sample"] = False
    if settings.get("do_sample") is False:
        for key in SAMPLING_ONLY:
            settings.pop(key, None)
    return settings, [u for u in until if u]


def cut_at_stop_strings(text: str, until: Sequence[str]) -> str:
    """`text` up to the first occurrence of any stop string, stripped.

    Example:
        >>> cut_at_stop_strings("yes.\\nQuestion: no", ["\\n", "Question:"])
        'yes.'
    """
    end = min([text.find(stop) for stop in until if stop in text], default=len(text))
    return text[:end].strip()


def side_by_side(images: Sequence[Image.Image]) -> Image.Image:
    """Images in a row on a white canvas, each scaled to the tallest one's height (aspect ratio kept)."""
    height = max(image.height for image in images)
    scaled = [image.resize((max(1, round(image.width * height / image.height)), height)) for image in images]
    canvas = Image.new("RGB", (sum(image.width for image in scaled), height), (255, 255, 255))
    x = 0
    for image in scaled:
        canvas.paste(image, (x, 0))
        x += image.width
    return canvas


def batches_by_length(lengths: Sequence[int], groups: Sequence[Any], size: int) -> Iterator[list[int]]:
    """Indices in batches of at most `size`, never mixing groups, longest first within a group (as lmms-eval's
    models: a too-large batch fails at once, and rows of similar length waste little padding)."""
    members: dict[Any, list[int]] = {}
    for index, group in enumerate(groups):
        members.setdefault(group, []).append(index)
    for indices in members.values():
        indices = sorted(indices, key=lambda i: -lengths[i])  # stable: equal lengths keep request order
        for start in range(0, len(indices), size):
            yield indices[start : start + size]


def settings_key(gen_kwargs: Any) -> str:
    """A hashable stand-in for a request's generation settings (requests batch together only when equal)."""
    return json.dumps(gen_kwargs, sort_keys=True, default=repr)


def request_args(request: Any, expected: int, kind: str) -> tuple:
    args = request.args
    if len(args) != expected:
        second = "gen_kwargs" if kind == "generate_until" else "continuation"
        raise ValueError(
            f"A `{kind}` request must hold {expected} arguments (context, {second}, doc_to_visual, doc_id, task, "
            f"split), found {len(args)}: {args!r}. Requests without an image (e.g. the unconditional ones of "
            "`acc_mutual_info`) are not supported: InstructBLIP needs an image."
        )
    return args


def int_arg(name: str, value: Any) -> int:
    """An int >= 1, or its decimal string (model_args arrive as strings)."""
    if isinstance(value, str) and value.strip().startswith("auto"):
        raise ValueError(f"`{name}` must be an int >= 1 ('auto' batch sizes are not supported), found {value!r}.")
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    return check_int(name, value)


def parse_dtype(value: str | torch.dtype) -> str | torch.dtype:
    """"auto", a torch dtype or its name ("bfloat16") -> what `from_pretrained(dtype=...)` takes."""
    if isinstance(value, torch.dtype) or value == "auto":
        return value
    dtype = getattr(torch, str(value), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"`dtype` must be 'auto' or a torch dtype name such as 'bfloat16', found {value!r}.")
    return dtype
