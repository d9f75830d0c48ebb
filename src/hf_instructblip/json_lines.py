"""The one JSON-lines reader (training sources, evaluation data, predictions files): one JSON object per line,
blank lines skipped, every error naming the file and the line.

Progress: with ``progress=True`` a bar on stderr counts the bytes read. It is transformers' tqdm, so
`transformers.utils.logging.disable_progress_bar()` (or ``HF_HUB_DISABLE_PROGRESS_BARS=1``) hides it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

from transformers.utils import logging as hf_logging


def iter_json_lines(path: str | os.PathLike, *, progress: bool = False) -> Iterator[tuple[int, dict[str, Any]]]:
    """(1-based line number, object) for every non-blank line of `path`; `progress` shows a bar of bytes read.

    Example:
        >>> next(iter_json_lines("train.jsonl"))
        (1, {'image': 'a.png', 'caption': 'a dog'})
    """
    with open(path, "rb") as handle:  # bytes, so that a line that is not UTF-8 is reported by number as well
        bar = hf_logging.tqdm(total=os.fstat(handle.fileno()).st_size, unit="B", unit_scale=True,
                              desc=f"reading {os.path.basename(path)}", disable=not progress)
        with bar:
            for number, raw in enumerate(handle, start=1):
                bar.update(len(raw))
                if not raw.strip():
                    continue
                yield number, _parse(raw, path, number)


def _parse(raw: bytes, path: str | os.PathLike, number: int) -> dict[str, Any]:
    """One line -> its JSON object, or a ValueError naming the file and the line."""
    try:
        row = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        json_error = isinstance(error, json.JSONDecodeError)
        detail = f"{error.msg}, column {error.colno}" if json_error else "not UTF-8"
        raise ValueError(f"{path}, line {number}: malformed JSON ({detail}).") from None
    if not isinstance(row, dict):
        raise ValueError(f"{path}, line {number}: expected a JSON object, found {type(row).__name__}.")
    return row


def read_json_lines(path: str | os.PathLike, *, progress: bool = True) -> list[dict[str, Any]]:
    """The objects of a JSON-lines file, in order: `[row for _, row in iter_json_lines(path)]`, with a progress
    bar on stderr unless `progress=False` or transformers' progress bars are disabled."""
    return [row for _, row in iter_json_lines(path, progress=progress)]
