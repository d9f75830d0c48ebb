"""The one JSON-lines reader (training sources, evaluation data, predictions files): one JSON object per line,
blank lines skipped, every error naming the file and the line."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any


def iter_json_lines(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """(1-based line number, object) for every non-blank line of `path`.

    Example:
        >>> next(iter_json_lines("train.jsonl"))
        (1, {'image': 'a.png', 'caption': 'a dog'})
    """
    with open(path, "rb") as handle:  # bytes, so that a line that is not UTF-8 is reported by number as well
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                json_error = isinstance(error, json.JSONDecodeError)
                detail = f"{error.msg}, column {error.colno}" if json_error else "not UTF-8"
                raise ValueError(f"{path}, line {number}: malformed JSON ({detail}).") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}, line {number}: expected a JSON object, found {type(row).__name__}.")
            yield number, row


def read_json_lines(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The objects of a JSON-lines file, in order: `[row for _, row in iter_json_lines(path)]`."""
    return [row for _, row in iter_json_lines(path)]
