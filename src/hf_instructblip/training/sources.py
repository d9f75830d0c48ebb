"""Mixture sources: what one dataset of an instruction mixture is (`MixtureSource`) and how its rows become the
collator's records. One rule for both mixtures: the map-style `training.mixture` and the streaming
`training.streaming` read sources only through these functions.

Rows are read through `MixtureSource.columns` (record field -> source column) and one rule for list-valued answers:
the most frequent answer, ties to the one that comes first (`most_frequent_answer`).
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..model.images import load_image
from ..model.validation import check_choice
from ..templates import INSTRUCTION_STYLES, make_instruction_record


# The example fields `make_instruction_record` reads, i.e. what `MixtureSource.columns` may map.
RECORD_FIELDS = ("image", "question", "answer", "caption", "options", "context", "ocr_tokens")


@dataclass(frozen=True)
class MixtureSource:
    """One dataset of a mixture.

    - `name`: for logging and the sampler's `multipliers` / the stream's `probabilities`.
    - `data`: a map-style dataset of dicts (`datasets.Dataset`, a list, ...), a JSON-lines path, or, for
      `build_streaming_mixture` only, an iterable of dicts (`datasets.IterableDataset`, a torch `IterableDataset`).
      Not a `DatasetDict`: pick a split (`dd["train"]`).
    - `task`: see `templates.template_family`; default `name`.
    - `image_root`: where relative image paths start; default a JSON-lines file's folder.
    - `columns`: record field -> source column, for fields named otherwise in the source; fields from
      `RECORD_FIELDS` (`image`, `question`, `answer`, `caption`, `options`, `context`, `ocr_tokens`).
    - `instructions`: "templates" (the paper's instruction templates), or the paper's multitask baselines (Table 4):
      "none" (the raw input alone) or "dataset_name" (the raw input after "[category:dataset]"); see
      `templates.make_instruction_record`.

    A list-valued answer (strings or `{"answer": ...}` dicts) becomes its most frequent answer, ties going to the
    one that comes first (`most_frequent_answer`); a list of captions gives one caption per row, drawn by
    `make_instruction_record`.

    Example (HF VQAv2: `answers` is a list of `{"answer": ...}` dicts; the most frequent one is learned):
        >>> MixtureSource("vqav2", hf_vqav2, task="vqav2", columns={"answer": "answers"}).columns
        {'answer': 'answers'}
    """

    name: str
    data: Any
    task: str | None = None
    image_root: str | os.PathLike | None = None
    columns: Mapping[str, str] | None = None
    instructions: str = "templates"


# --- rows -> examples ----------------------------------------------------------------------------------------
def check_columns(columns: Mapping[str, str] | None, name: str) -> dict[str, str]:
    """`MixtureSource.columns` validated: a {record field: source column} dict of strings."""
    if columns is None:
        return {}
    if not isinstance(columns, Mapping):
        raise TypeError(f"MixtureSource {name!r}: columns: expected a {{record field: source column}} dict, "
                        f"got {type(columns).__name__}")
    for field, column in columns.items():
        if field not in RECORD_FIELDS:
            raise ValueError(f"MixtureSource {name!r}: columns: expected record fields from {list(RECORD_FIELDS)} "
                             f"as keys, got {field!r}")
        if not isinstance(column, str):
            raise TypeError(f"MixtureSource {name!r}: columns[{field!r}]: expected a column name (str), "
                            f"got {type(column).__name__} {column!r}")
    return dict(columns)


def check_column_names(data: Any, columns: Mapping[str, str], name: str) -> None:
    """Mapped columns that a dataset with known `column_names` lacks fail now, not at its first row."""
    column_names = getattr(data, "column_names", None)
    if not isinstance(column_names, (list, tuple)):  # lists have none; a streamed dataset may not know its own
        return
    for field, column in columns.items():
        if column not in column_names:
            raise ValueError(f"MixtureSource {name!r}: columns[{field!r}] = {column!r}, but the source has no column "
                             f"{column!r}; its columns are {list(column_names)}")


def most_frequent_answer(answers: Any, where: str = "answer") -> Any:
    """A list of answers -> the most frequent one, ties going to the one that comes first; anything else as is.

    Elements may be strings or `{"answer": str, ...}` dicts (HF VQAv2's `answers`); a `{"answer": [...]}` dict of
    lists (a `datasets.Sequence` of dicts) counts as its list. An empty list stays empty (the record check then
    asks for an answer).

    Example:
        >>> most_frequent_answer(["red", {"answer": "blue"}, "blue", "red"])
        'red'
    """
    if isinstance(answers, Mapping) and "answer" in answers:
        answers = answers["answer"]
    if not isinstance(answers, (list, tuple)) or not answers:
        return answers
    texts = []
    for i, answer in enumerate(answers):
        text = answer.get("answer") if isinstance(answer, Mapping) else answer
        if not isinstance(text, str):
            raise TypeError(f"{where}[{i}]: expected a str or an {{'answer': str}} dict, got "
                            f"{type(answer).__name__} {answer!r}")
        texts.append(text)
    counts = Counter(texts)
    return max(texts, key=counts.__getitem__)  # max keeps the first of equal counts: the earliest answer wins


def prepare_row(row: Any, columns: Mapping[str, str], where: str) -> dict[str, Any]:
    """A source row -> an example for `make_instruction_record`: mapped columns under their record field names,
    a list-valued `answer` reduced to its most frequent answer (ties: the first).

    Example:
        >>> prepare_row({"img": "a.png", "q": "Why?", "answers": ["rain", "snow", "rain"]},
        ...             {"image": "img", "question": "q", "answer": "answers"}, "vqa[0]")["answer"]
        'rain'
    """
    if not isinstance(row, Mapping):
        raise TypeError(f"{where}: expected a dict example, got {type(row).__name__}")
    missing = [column for column in columns.values() if column not in row]
    if missing:
        field = next(field for field, column in columns.items() if column == missing[0])
        raise ValueError(f"{where}: column {missing[0]!r} (mapped to {field!r} by columns) is missing; "
                         f"the row has columns {sorted(row)}")
    example = {**row, **{field: row[column] for field, column in columns.items()}}
    if "answer" in example:
        example["answer"] = most_frequent_answer(example["answer"], f"{where} answer")
    return example


def source_record(example: Mapping[str, Any], task: str, *, seed: int, index: int, name: str,
                  image_root: str | os.PathLike | None, instructions: str = "templates") -> dict[str, Any]:
    """A prepared example -> the collator's record, image loaded; errors name the source and the row."""
    where = f"{name}[{index}]"
    try:
        record = make_instruction_record(example, task, seed=seed, index=index, dataset=name,
                                         instructions=instructions)
    except (TypeError, ValueError) as error:
        raise type(error)(f"{where}: {error}") from None
    if "image" not in record:
        raise ValueError(f"{where}: expected an 'image' (instruction mixtures hold image records), got fields "
                         f"{sorted(example)}")
    record["image"] = load_image(record["image"], image_root, where=f"{where} image")
    return record


# --- what a source is ------------------------------------------------------------------------------------------
def refuse_split_dicts(data: Any, name: str) -> None:
    """A `DatasetDict` (splits by name) is a dict, whose len is its number of splits: refuse it, naming the splits.
    `datasets` is imported only if the caller already did, and only then can `data` be one."""
    if not isinstance(data, Mapping):
        return
    datasets = sys.modules.get("datasets")
    split_dicts = (datasets.DatasetDict, datasets.IterableDatasetDict) if datasets is not None else ()
    if isinstance(data, split_dicts):
        splits = list(data)
        example = f'dd[{splits[0]!r}]' if splits else 'dd["train"]'
        raise TypeError(f"MixtureSource {name!r}: data is a {type(data).__name__} with splits {splits}; pass one "
                        f"split, e.g. data={example}")
    raise TypeError(f"MixtureSource {name!r}: data: expected a dataset of dict rows (a list, a datasets.Dataset, a "
                    f"JSON-lines path), got a {type(data).__name__} with keys {list(data)[:10]}")


def is_map_style(data: Any) -> bool:
    return hasattr(data, "__getitem__") and hasattr(data, "__len__") and not isinstance(data, (str, bytes))


def shards_itself(data: Any) -> bool:
    """True for a `datasets.IterableDataset`: inside a DataLoader worker it yields only that worker's shards."""
    datasets = sys.modules.get("datasets")
    return datasets is not None and isinstance(data, datasets.IterableDataset)


def image_root_of(source: MixtureSource) -> str | os.PathLike | None:
    if source.image_root is None and isinstance(source.data, (str, os.PathLike)):
        return Path(source.data).parent  # a JSON-lines file's image paths start at its folder
    return source.image_root


def as_sources(sources: Sequence[MixtureSource] | Mapping[str, Any]) -> list[MixtureSource]:
    if isinstance(sources, Mapping):
        sources = [MixtureSource(name, data) for name, data in sources.items()]
    if isinstance(sources, (str, bytes)) or not isinstance(sources, Sequence) or len(sources) == 0:
        raise ValueError(f"sources: expected a non-empty list of MixtureSource or a {{name: data}} dict, got {sources!r}")
    for i, source in enumerate(sources):
        if not isinstance(source, MixtureSource):
            raise TypeError(f"sources[{i}]: expected a MixtureSource, got {type(source).__name__}")
        check_choice(f"sources[{i}].instructions", source.instructions, INSTRUCTION_STYLES)
    names = [source.name for source in sources]
    if len(set(names)) != len(names):
        raise ValueError(f"sources: expected distinct names, got {names}")
    return list(sources)
