"""What every converter shares: reading the official files, checking fields with errors that name the file, the
record and the field, image paths relative to the output file, and the `Conversion` a converter returns.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...model.processing_video import list_frames


class Skip(Exception):
    """Raised by a converter for an item the paper's protocol leaves out (e.g. a ScienceQA question without an
    image); the reason is counted in the summary."""


@dataclass
class Conversion:
    """A converter's work: the official items (for the progress bar's total) and the function that turns one
    (index, item) into a record, or raises `Skip`."""

    items: Sequence[Any]
    convert: Callable[[int, Any], dict[str, Any]]


def where(path: str | os.PathLike, index: int, record_id: Any = None) -> str:
    """How errors name a record: "gqa.json: record 12 (id '2011')"."""
    named = f" (id {record_id!r})" if record_id is not None else ""
    return f"{path}: record {index}{named}"


def load_json(path: str | os.PathLike, what: str = "--annotations") -> Any:
    """A whole JSON file; a missing file or malformed JSON names the file (and the line and column)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{what}: {str(path)!r} is not a file.")
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: malformed JSON ({error.msg}, line {error.lineno}, column {error.colno}).") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text.") from None


def load_csv(path: str | os.PathLike, columns: Sequence[str], what: str = "--annotations") -> list[dict[str, str]]:
    """The rows of a CSV file with a header, which must hold `columns`."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{what}: {str(path)!r} is not a file.")
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: the header lacks the column(s) {missing}; found {reader.fieldnames}.")
        return list(reader)


def expect(container: Any, kind: type | tuple[type, ...], path: str | os.PathLike, what: str) -> Any:
    """`container` (the file's top level, or a part of it) must be of `kind`."""
    if not isinstance(container, kind):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise ValueError(f"{path}: expected {what} to be a JSON {names}, found {type(container).__name__}.")
    return container


def field(item: Any, name: str, kind: str, at: str) -> Any:
    """`item[name]`, checked: kind "str" (non-empty), "int", "strs" (non-empty list of non-empty str), "ints",
    "list" or "dict". Errors name the record (`at`) and the field.

    Example:
        >>> field({"question": "Why?"}, "question", "str", "gqa.json: record 1")
        'Why?'
    """
    if not isinstance(item, Mapping):
        raise ValueError(f"{at}: expected a JSON object, found {type(item).__name__}.")
    if name not in item:
        raise ValueError(f"{at}: field {name!r} is missing (found fields {sorted(item)}).")
    value = item[name]
    checks = {
        "str": lambda v: isinstance(v, str) and v.strip() != "",
        "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "strs": lambda v: isinstance(v, list) and v != [] and all(isinstance(s, str) and s.strip() for s in v),
        "ints": lambda v: isinstance(v, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in v),
        "list": lambda v: isinstance(v, list),
        "dict": lambda v: isinstance(v, Mapping),
    }
    if not checks[kind](value):
        wanted = {"str": "a non-empty string", "int": "an integer", "strs": "a non-empty list of non-empty strings",
                  "ints": "a list of integers", "list": "a list", "dict": "an object"}[kind]
        raise ValueError(f"{at}: field {name!r} must be {wanted}, found {value!r}.")
    return value


class Paths:
    """Image (or frame folder) paths under the images root, written relative to the output file's folder (as
    `tasks.load_records` resolves them) and checked to exist; folders are checked once each."""

    def __init__(self, images: str | os.PathLike, output: str | os.PathLike):
        self.root = Path(images)
        if not self.root.is_dir():
            raise ValueError(f"--images: {str(self.root)!r} is not a folder.")
        self.out_dir = Path(output).resolve().parent
        self._folders: dict[Path, bool] = {}

    def image(self, relative: str, at: str) -> str:
        """The record's `image` for `relative` (a path under the images root)."""
        path = self.root / relative
        if not path.is_file():
            raise ValueError(f"{at}: image file {str(path)!r} does not exist under --images {str(self.root)!r}.")
        return os.path.relpath(path.resolve(), self.out_dir)

    def frames(self, names: Sequence[str], at: str) -> str:
        """The record's `video`: the first of `names` that is a folder of frames under the images root."""
        for name in names:
            folder = self.root / name
            if folder not in self._folders:  # many questions share a video: list each folder once
                # list_frames raises when the folder holds no frame images
                self._folders[folder] = folder.is_dir() and bool(list_frames(folder, where=at))
            if self._folders[folder]:
                return os.path.relpath(folder.resolve(), self.out_dir)
        raise ValueError(f"{at}: no frame folder {' or '.join(repr(n) for n in names)} under --images "
                         f"{str(self.root)!r} (decode each video to a folder of frames named like the video).")
