"""Instruction mixture builders: several datasets + task names -> instruction records, a balanced order, a collator.

Each source becomes records ``{"image": PIL image, "instruction", "answer", "dataset"}`` through
`make_instruction_record`, with a template of its task fixed by (seed, source, row index).

- `build_instruction_mixture`: map-style sources (a `datasets.Dataset`, a list of dicts, a JSON-lines file) ->
  `ConcatDataset` + `BalancedConcatSampler`: exact per-dataset counts every epoch.
- `training.streaming.build_streaming_mixture`: iterable sources too, an endless stream with fixed source
  probabilities (train with `max_steps`). Only the expected shares are fixed: exact per-epoch counts need map-style
  data.

Sources and their rows: `training.sources` (`MixtureSource`, the column mapping, the answer rule).

Progress: bars on stderr (transformers' tqdm) while JSON-lines files are read and rows are checked;
`transformers.utils.logging.disable_progress_bar()` hides them. Nothing returned depends on them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch.utils.data import ConcatDataset, Dataset, IterableDataset
from transformers.utils import logging as hf_logging

from ..json_lines import read_json_lines
from ..templates import make_instruction_record, template_family
from .collator import InstructBlipDataCollator
from .sampler import BalancedConcatSampler
from .sources import (
    MixtureSource,
    as_sources,
    check_column_names,
    check_columns,
    image_root_of,
    is_map_style,
    most_frequent_answer,
    prepare_row,
    refuse_split_dicts,
    source_record,
)

__all__ = ["InstructionDataset", "InstructionMixture", "MixtureSource", "build_instruction_mixture",
           "mixture_collator", "most_frequent_answer"]

# --- map-style ---------------------------------------------------------------------------------------------
class InstructionDataset(Dataset):
    """A source's raw examples as collator records ``{image, instruction, answer, dataset}``.

    Example:
        >>> InstructionDataset([{"image": image, "text": "a dog"}], task="coco_caption",
        ...                    columns={"caption": "text"})[0]["answer"]
        'a dog'
    """

    def __init__(self, data: Any, task: str, *, name: str | None = None, seed: int = 0,
                 image_root: str | os.PathLike | None = None, columns: Mapping[str, str] | None = None,
                 instructions: str = "templates") -> None:
        name = task if name is None else name
        refuse_split_dicts(data, name)
        if not is_map_style(data):
            raise TypeError(f"{name}: data: expected a map-style dataset (len and indexing), got "
                            f"{type(data).__name__}; "
                            "for iterable data (datasets.IterableDataset, streaming) use build_streaming_mixture")
        template_family(task)  # fail now on an unknown task, not in a DataLoader worker
        self.data, self.task, self.name = data, task, name
        self.seed, self.image_root, self.instructions = seed, image_root, instructions
        self.columns = check_columns(columns, name)
        check_column_names(data, self.columns, name)
        self._check_rows()

    def _check_rows(self) -> None:
        """Every row's fields, now rather than hours into training; images are only checked when read (a
        `datasets.Dataset` is read without its image column, so nothing is decoded here)."""
        image_column = self.columns.get("image", "image")
        column_names = getattr(self.data, "column_names", None)
        drop_images = isinstance(column_names, (list, tuple)) and image_column in column_names
        rows = self.data.remove_columns(image_column) if drop_images else self.data
        columns = {field: column for field, column in self.columns.items() if field != "image" or not drop_images}
        for index in hf_logging.tqdm(range(len(rows)), desc=f"checking {self.name}", unit="row"):
            where = f"{self.name}[{index}]"
            example = prepare_row(rows[index], columns, where)
            if not drop_images and example.get("image") is None:
                raise ValueError(f"{where}: expected an 'image', got fields {sorted(example)}")
            try:
                make_instruction_record({**example, "image": None}, self.task, seed=self.seed, index=index,
                                        instructions=self.instructions)
            except (TypeError, ValueError) as error:
                raise type(error)(f"{where}: {error}") from None

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = prepare_row(self.data[index], self.columns, f"{self.name}[{index}]")
        return source_record(example, self.task, seed=self.seed, index=index, name=self.name,
                             image_root=self.image_root, instructions=self.instructions)


# --- builders ------------------------------------------------------------------------------------------------
@dataclass
class InstructionMixture:
    """What `InstructBlipTrainer` needs: ``train_dataset=dataset, train_sampler=sampler, data_collator=collator``
    (`sampler` is None for a streaming mixture, which fixes its own order)."""

    dataset: ConcatDataset | IterableDataset  # a `StreamingInstructionMixture` for a streaming mixture
    sampler: BalancedConcatSampler | None
    collator: Any | None


def _source_dataset(source: MixtureSource, seed: int) -> InstructionDataset:
    data = source.data
    if isinstance(data, (str, os.PathLike)):
        data = read_json_lines(data)
    return InstructionDataset(data, source.task or source.name, name=source.name, seed=seed,
                              image_root=image_root_of(source), columns=source.columns,
                              instructions=source.instructions)


def mixture_collator(processor: Any, decoder_only: bool | None,
              collator_kwargs: Mapping[str, Any] | None) -> InstructBlipDataCollator | None:
    if processor is None:
        return None
    if not isinstance(decoder_only, bool):
        raise ValueError("decoder_only: expected a bool with a processor "
                         f"(model.config.use_decoder_only_language_model), got {decoder_only!r}")
    return InstructBlipDataCollator(processor, decoder_only=decoder_only, **dict(collator_kwargs or {}))


def build_instruction_mixture(
    sources: Sequence[MixtureSource] | Mapping[str, Any], *, processor: Any = None, decoder_only: bool | None = None,
    collator_kwargs: Mapping[str, Any] | None = None, alpha: float = 0.5,
    multipliers: Sequence[float] | Mapping[str | int, float] | None = None, size_cap: int | None = None,
    num_samples: int | None = None, seed: int = 0,
) -> InstructionMixture:
    """Concatenate map-style sources as instruction records and balance them with `BalancedConcatSampler`.

    A `{name: data}` dict uses each name as the task. The collator is built when `processor` is given.
    `seed` drives both the sampler and the templates. Every row is checked now (progress bar on stderr).

    Example:
        >>> mixture = build_instruction_mixture(
        ...     [MixtureSource("coco", "coco.jsonl", task="coco_caption"),
        ...      MixtureSource("vqa", hf_vqa, task="vqav2", columns={"answer": "multiple_choice_answer"})],
        ...     processor=processor, decoder_only=True, multipliers={"vqa": 2.0})
        >>> trainer = InstructBlipTrainer(model, args, train_dataset=mixture.dataset,
        ...                               train_sampler=mixture.sampler, data_collator=mixture.collator)
    """
    sources = as_sources(sources)
    for source in sources:  # before any source is read
        refuse_split_dicts(source.data, source.name)
        check_columns(source.columns, source.name)
    dataset = ConcatDataset([_source_dataset(source, seed) for source in sources])
    sampler = BalancedConcatSampler(dataset, alpha=alpha, multipliers=multipliers, size_cap=size_cap,
                                    num_samples=num_samples, names=[source.name for source in sources], seed=seed)
    return InstructionMixture(dataset=dataset, sampler=sampler,
                              collator=mixture_collator(processor, decoder_only, collator_kwargs))
