"""Argument checks shared by the whole package, with one message style: "`name` must be EXPECTED, found VALUE."
(TypeError for a value of the wrong type, ValueError for one out of range). It lives in `model/` because the model
ships as remote code importing nothing outside its folder; training and evaluation import it from here."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any


def check_int(name: str, value: Any, minimum: int = 1, *, allow_none: bool = False) -> int | None:
    """`value` as an int >= `minimum` (numpy ints too; bools refused), or None when `allow_none`.

    Example:
        >>> check_int("batch_size", 8)
        8
        >>> check_int("batch_size", 0)
        Traceback (most recent call last):
        ValueError: `batch_size` must be an int >= 1, found 0.
    """
    if value is None and allow_none:
        return None
    expected = f"an int >= {minimum}{' or None' if allow_none else ''}"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be {expected}, found {type(value).__name__} {value!r}.")
    if value < minimum:
        raise ValueError(f"`{name}` must be {expected}, found {value!r}.")
    return int(value)


def check_weight(name: str, value: Any) -> float:
    """`value` as a finite float >= 0 (a probability weight, a multiplier, an exponent)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a finite number >= 0, found {type(value).__name__} {value!r}.")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"`{name}` must be a finite number >= 0, found {value!r}.")
    return float(value)


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> Any:
    """`value` if it is one of `choices`."""
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {list(choices)}, found {value!r}.")
    return value
