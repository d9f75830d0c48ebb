"""The paper's reported zero-shot scores (Table 1 of arXiv 2305.06500), for printing beside ours.

Loaded from `paper_results.json` (values, splits and how they were checked); this module is its only reader. The
paper prints percent and CIDEr x 100; our metrics are fractions and CIDEr-D on its 0-10 scale, so both compare
after `to_paper_scale` (x 100).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from importlib import resources
from types import MappingProxyType
from typing import Any

from ..templates import HELD_OUT

_DATA: dict[str, Any] = json.loads(
    resources.files("hf_instructblip").joinpath("paper_results.json").read_text("utf-8"))

PAPER_LLMS: tuple[str, ...] = tuple(_DATA["llms"])
PAPER_SOURCE: Mapping[str, str] = MappingProxyType(dict(_DATA["source"]))
# llm -> the official checkpoint of that paper row, e.g. "vicuna-7b" -> "Salesforce/instructblip-vicuna-7b"
PAPER_CHECKPOINTS: Mapping[str, str] = MappingProxyType(
    {llm: info["checkpoint"] for llm, info in _DATA["llms"].items()})
# task -> {"column", "split", "metric", "unit", "scores": {llm: value or None}}
PAPER_ZERO_SHOT: Mapping[str, Mapping[str, Any]] = MappingProxyType(
    {task: MappingProxyType(entry) for task, entry in _DATA["tasks"].items()})


def paper_zero_shot(task: str, llm: str) -> float | None:
    """The paper's zero-shot score of `task` for InstructBLIP with `llm` (None where the paper gives none).

    Example:
        >>> paper_zero_shot("gqa", "vicuna-7b")
        49.2
    """
    if task not in HELD_OUT:
        raise ValueError(f"`task` must be one of the held-out tasks {list(HELD_OUT)}, found {task!r}.")
    if llm not in PAPER_LLMS:
        raise ValueError(f"`llm` must be one of {list(PAPER_LLMS)}, found {llm!r}.")
    return PAPER_ZERO_SHOT[task]["scores"].get(llm)


def to_paper_scale(value: float) -> float:
    """One of our metric values (a fraction, or CIDEr-D on its 0-10 scale) on the paper's scale (percent, CIDEr x 100).

    Example:
        >>> round(to_paper_scale(0.492), 1)
        49.2
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`value` must be a number, found {type(value).__name__}.")
    return 100.0 * value
