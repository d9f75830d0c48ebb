"""Instruction mixture builder: several datasets + task names -> ConcatDataset, balanced sampler, collator.

Each source is a map-style dataset of dicts (a `datasets.Dataset`, a list, ...) or a JSON-lines file of such rows;
every example becomes ``{"image": PIL image, "instruction", "answer", "dataset"}`` through
`make_instruction_record`, with a template of its task fixed by (seed, source, index).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch.utils.data import ConcatDataset, Dataset

from ..json_lines import read_json_lines
from ..model.images import load_image
from .collator import InstructBlipDataCollator
from .sampler import BalancedConcatSampler
from ..templates import make_instruction_record, template_family


@dataclass(frozen=True)
class MixtureSource:
    """One dataset of the mixture: `name` (logging, sampler multipliers), `data` (a map-style dataset of dicts or
    a JSON-lines path), `task` (see `templates.template_family`; default `name`) and `image_root` (where relative
    image paths start; default a JSON-lines file's folder).

    Example:
        >>> MixtureSource("my_vqa", "train.jsonl", task="vqa")
        MixtureSource(name='my_vqa', data='train.jsonl', task='vqa', image_root=None)
    """

    name: str
    data: Any
    task: str | None = None
    image_root: str | os.PathLike | None = None


class InstructionDataset(Dataset):
    """A source's raw examples as collator records ``{image, instruction, answer, dataset}``.

    Example:
        >>> InstructionDataset([{"image": image, "caption": "a dog"}], task="coco_caption")[0]["answer"]
        'a dog'
    """

    def __init__(self, data: Any, task: str, *, name: str | None = None, seed: int = 0,
                 image_root: str | os.PathLike | None = None) -> None:
        if not hasattr(data, "__getitem__") or not hasattr(data, "__len__"):
            raise TypeError(f"data: expected a map-style dataset (len and indexing), got {type(data).__name__}")
        template_family(task)  # fail now on an unknown task, not in a DataLoader worker
        self.data, self.task, self.name = data, task, task if name is None else name
        self.seed, self.image_root = seed, image_root
        self._check_rows()

    def _check_rows(self) -> None:
        """Every row's fields, now rather than hours into training; images are only checked when read (a
        `datasets.Dataset` is read without its image column, so nothing is decoded here)."""
        columns = getattr(self.data, "column_names", None)
        rows = self.data.remove_columns("image") if columns is not None and "image" in columns else self.data
        for index in range(len(rows)):
            example = rows[index]
            if not isinstance(example, Mapping):
                raise TypeError(f"{self.name}[{index}]: expected a dict example, got {type(example).__name__}")
            if columns is None and example.get("image") is None:
                raise ValueError(f"{self.name}[{index}]: expected an 'image', got fields {sorted(example)}")
            try:
                make_instruction_record({**example, "image": None}, self.task, seed=self.seed, index=index)
            except (TypeError, ValueError) as error:
                raise type(error)(f"{self.name}[{index}]: {error}") from None

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = make_instruction_record(self.data[index], self.task, seed=self.seed, index=index, dataset=self.name)
        record["image"] = load_image(record["image"], self.image_root, where=f"{self.name}[{index}] image")
        return record


@dataclass
class InstructionMixture:
    """What `InstructBlipTrainer` needs: ``train_dataset=dataset, train_sampler=sampler, data_collator=collator``."""

    dataset: ConcatDataset
    sampler: BalancedConcatSampler
    collator: Any | None


def _as_sources(sources: Sequence[MixtureSource] | Mapping[str, Any]) -> list[MixtureSource]:
    if isinstance(sources, Mapping):
        sources = [MixtureSource(name, data) for name, data in sources.items()]
    if isinstance(sources, (str, bytes)) or not isinstance(sources, Sequence) or len(sources) == 0:
        raise ValueError(f"sources: expected a non-empty list of MixtureSource or a {{name: data}} dict, got {sources!r}")
    for i, source in enumerate(sources):
        if not isinstance(source, MixtureSource):
            raise TypeError(f"sources[{i}]: expected a MixtureSource, got {type(source).__name__}")
    return list(sources)


def _source_dataset(source: MixtureSource, seed: int) -> InstructionDataset:
    data, root = source.data, source.image_root
    if isinstance(data, (str, os.PathLike)):
        root = Path(data).parent if root is None else root
        data = read_json_lines(data)
    return InstructionDataset(data, source.task or source.name, name=source.name, seed=seed, image_root=root)


def build_instruction_mixture(
    sources: Sequence[MixtureSource] | Mapping[str, Any], *, processor: Any = None, decoder_only: bool | None = None,
    collator_kwargs: Mapping[str, Any] | None = None, alpha: float = 0.5,
    multipliers: Sequence[float] | Mapping[str | int, float] | None = None, size_cap: int | None = None,
    num_samples: int | None = None, seed: int = 0,
) -> InstructionMixture:
    """Concatenate the sources as instruction records and balance them with `BalancedConcatSampler`.

    A `{name: data}` dict uses each name as the task. The collator is built when `processor` is given.
    `seed` drives both the sampler and the templates.

    Example:
        >>> mixture = build_instruction_mixture(
        ...     [MixtureSource("coco", "coco.jsonl", task="coco_caption"), MixtureSource("vqa", hf_vqa, task="vqav2")],
        ...     processor=processor, decoder_only=True, multipliers={"vqa": 2.0})
        >>> trainer = InstructBlipTrainer(model, args, train_dataset=mixture.dataset,
        ...                               train_sampler=mixture.sampler, data_collator=mixture.collator)
    """
    sources = _as_sources(sources)
    names = [source.name for source in sources]
    if len(set(names)) != len(names):
        raise ValueError(f"sources: expected distinct names, got {names}")
    dataset = ConcatDataset([_source_dataset(source, seed) for source in sources])
    sampler = BalancedConcatSampler(dataset, alpha=alpha, multipliers=multipliers, size_cap=size_cap,
                                    num_samples=num_samples, names=names, seed=seed)
    collator = None
    if processor is not None:
        if not isinstance(decoder_only, bool):
            raise ValueError("decoder_only: expected a bool with a processor "
                             f"(model.config.use_decoder_only_language_model), got {decoder_only!r}")
        collator = InstructBlipDataCollator(processor, decoder_only=decoder_only, **dict(collator_kwargs or {}))
    return InstructionMixture(dataset=dataset, sampler=sampler, collator=collator)
