"""Streaming instruction mixture: iterable sources (`datasets.IterableDataset`, any re-iterable of dicts) -> an
endless stream of instruction records whose sources are drawn with fixed probabilities (train with `max_steps`).

Only the expected shares are fixed: exact per-epoch counts need map-style data (`build_instruction_mixture`). Rows go
through the same column mapping and record rule as the map-style mixture (`training.mixture`).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from ..json_lines import iter_json_lines
from ..templates import template_family
from .mixture import InstructionMixture, mixture_collator
from .sources import (
    MixtureSource,
    as_sources,
    check_column_names,
    check_columns,
    image_root_of,
    is_map_style,
    prepare_row,
    refuse_split_dicts,
    shards_itself,
    source_record,
)
from ..model.validation import check_int
from .sampler import mixture_weights, per_dataset

_CHOICE_STREAM = 2  # numpy stream tag of the streaming mixture's source draws (the sampler uses 0 and 1)
_CHOICE_CHUNK = 1024  # source draws per numpy call


def _stream_probabilities(
    sources: Sequence[MixtureSource], probabilities: Sequence[float] | Mapping[str, float] | None, alpha: float,
    multipliers: Sequence[float] | Mapping[str | int, float] | None, size_cap: int | None,
) -> tuple[float, ...]:
    """Each source's draw probability: given explicitly, or ``min(size, size_cap) ** alpha * multiplier``
    normalised (the `BalancedConcatSampler` rule) when every size is known."""
    names = [source.name for source in sources]
    if probabilities is None:
        sizes = [len(source.data) if is_map_style(source.data) else None for source in sources]
        unknown = [name for name, size in zip(names, sizes) if size is None]
        if unknown:
            raise ValueError(f"probabilities: the sizes of {unknown} are unknown (iterable sources and JSON-lines "
                             "paths have no len()); pass probabilities={name: p} for every source, e.g. "
                             "mixture_weights(sizes, alpha=0.5) from hf_instructblip.training.sampler")
        weights = mixture_weights(sizes, alpha, multipliers, size_cap, names)
    elif multipliers is not None or size_cap is not None:
        raise ValueError("probabilities: expected either probabilities or multipliers / size_cap, got both")
    else:
        weights = per_dataset(probabilities, names, "probabilities")
    total = sum(weights)
    if total <= 0:
        raise ValueError(f"probabilities: expected a positive sum, got {weights}")
    return tuple(weight / total for weight in weights)


class StreamingInstructionMixture(IterableDataset):
    """An endless stream of instruction records: each record's source is drawn with fixed probabilities.

    The source of the n-th record is a pure function of (seed, n) (numpy, no global RNG), and each source is read in
    its own order, restarting when it ends (``set_epoch(pass)`` first on sources that have it, so a shuffled
    `datasets.IterableDataset` reshuffles). A source's k-th row gets template index k, so a source read in the order
    of a map-style one gives the same records as `InstructionDataset`. Only the expected shares are fixed: exact
    per-epoch counts need map-style data (`build_instruction_mixture`).

    Several processes: every process iterates the same stream. `InstructBlipTrainer` sets
    ``accelerator_config.dispatch_batches=False`` for iterable data (other trainers: set it): accelerate then wraps the
    stream so that
    each rank keeps its own slice of every global batch (rank r of R, per-device batch B: records
    ``[g*R*B + r*B, g*R*B + (r+1)*B)`` of global batch g), distinct across ranks. Accelerate's default for iterable
    datasets (``dispatch_batches=True``: rank 0 reads and concatenates every rank's batch) fails on the collator's
    batches, whose lengths differ from batch to batch. In a loop of your own, keep every world_size-th record from
    rank's onwards (`itertools.islice(stream, rank, None, world_size)`).
    DataLoader workers: worker w of W draws its own stream, seeded by (seed, W, w), over its share of every source:
    a `datasets.IterableDataset` hands each worker whole shards (so it needs ``n_shards >= W``), any other source
    gives worker w its rows w, w + W, ... (whose template indices stay the source's row numbers).

    Example:
        >>> stream = StreamingInstructionMixture(
        ...     [MixtureSource("vqa", hf_vqa.to_iterable_dataset(), task="vqav2", columns={"answer": "answers"}),
        ...      MixtureSource("coco", coco_rows, task="coco_caption")], probabilities={"vqa": 0.7, "coco": 0.3})
        >>> next(iter(stream))["dataset"]
        'vqa'
    """

    def __init__(
        self, sources: Sequence[MixtureSource] | Mapping[str, Any], *,
        probabilities: Sequence[float] | Mapping[str, float] | None = None, alpha: float = 0.5,
        multipliers: Sequence[float] | Mapping[str | int, float] | None = None, size_cap: int | None = None,
        seed: int = 0,
    ) -> None:
        self.sources = as_sources(sources)
        for source in self.sources:
            self._check_source(source)
        self.columns = [check_columns(source.columns, source.name) for source in self.sources]
        for source, columns in zip(self.sources, self.columns):
            check_column_names(source.data, columns, source.name)
        self.names: tuple[str, ...] = tuple(source.name for source in self.sources)
        self.probabilities = _stream_probabilities(self.sources, probabilities, alpha, multipliers, size_cap)
        self.seed = check_int("seed", seed, 0)

    @staticmethod
    def _check_source(source: MixtureSource) -> None:
        data = source.data
        refuse_split_dicts(data, source.name)
        template_family(source.task or source.name)
        if isinstance(data, (str, os.PathLike)):
            if not Path(data).is_file():
                raise ValueError(f"MixtureSource {source.name!r}: data: expected a JSON-lines file, found no file at "
                                 f"{data}")
            return
        if is_map_style(data):
            return
        if isinstance(data, Iterator) or not hasattr(data, "__iter__"):
            raise TypeError(f"MixtureSource {source.name!r}: data: expected a dataset that can be iterated again and "
                            f"again (a datasets.IterableDataset, a torch IterableDataset, a list), got "
                            f"{type(data).__name__}{' (a one-shot iterator)' if isinstance(data, Iterator) else ''}")

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker = get_worker_info()
        shard, shards = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        rows = [self._rows(d, shard, shards) for d in range(len(self.sources))]
        for d in self.choices(shard, shards):
            index, row = next(rows[d])
            yield self._record(d, index, row)

    def choices(self, shard: int = 0, shards: int = 1) -> Iterator[int]:
        """The endless sequence of source numbers drawn by DataLoader worker `shard` of `shards`."""
        rng = np.random.default_rng([self.seed, _CHOICE_STREAM, shards, shard])
        probabilities = np.asarray(self.probabilities)
        while True:
            yield from rng.choice(len(probabilities), size=_CHOICE_CHUNK, p=probabilities).tolist()

    def _rows(self, d: int, shard: int, shards: int) -> Iterator[tuple[int, Any]]:
        """(template index, row) of this worker's share of source d, pass after pass."""
        source = self.sources[d]
        for epoch in itertools.count():
            if callable(getattr(source.data, "set_epoch", None)):
                source.data.set_epoch(epoch)
            empty = True
            for index, row in self._one_pass(source.data, shard, shards):
                empty = False
                yield index, row
            if empty:
                hint = (f" in DataLoader worker {shard} of {shards}: each worker reads its share of every source, "
                        f"so a source needs at least {shards} rows (a datasets.IterableDataset at least {shards} "
                        "shards); use fewer workers") if shards > 1 else ""
                raise ValueError(f"MixtureSource {source.name!r}: the source yielded no rows{hint}")

    @staticmethod
    def _one_pass(data: Any, shard: int, shards: int) -> Iterator[tuple[int, Any]]:
        if is_map_style(data):
            return ((i, data[i]) for i in range(shard, len(data), shards))
        rows = (row for _, row in iter_json_lines(data)) if isinstance(data, (str, os.PathLike)) else iter(data)
        if shards > 1 and shards_itself(data):  # already this worker's shards: unique indices across workers
            return ((k * shards + shard, row) for k, row in enumerate(rows))
        return ((k, row) for k, row in enumerate(rows) if k % shards == shard)

    def _record(self, d: int, index: int, row: Any) -> dict[str, Any]:
        source = self.sources[d]
        example = prepare_row(row, self.columns[d], f"{source.name}[{index}]")
        return source_record(example, source.task or source.name, seed=self.seed, index=index,
                             name=source.name, image_root=image_root_of(source), instructions=source.instructions)

    def __repr__(self) -> str:
        shares = ", ".join(f"{name}: {p:.4f}" for name, p in zip(self.names, self.probabilities))
        return f"StreamingInstructionMixture({{{shares}}}, seed={self.seed})"



def build_streaming_mixture(
    sources: Sequence[MixtureSource] | Mapping[str, Any], *, processor: Any = None, decoder_only: bool | None = None,
    collator_kwargs: Mapping[str, Any] | None = None,
    probabilities: Sequence[float] | Mapping[str, float] | None = None, alpha: float = 0.5,
    multipliers: Sequence[float] | Mapping[str | int, float] | None = None, size_cap: int | None = None,
    seed: int = 0,
) -> InstructionMixture:
    """Mix iterable (streaming) sources: an endless `StreamingInstructionMixture` + the collator; train with
    ``TrainingArguments(max_steps=...)``.

    Probabilities: `probabilities` ({name: p} or one per source, normalised), or, when every source has a len(),
    the `BalancedConcatSampler` rule from `alpha`, `multipliers` and `size_cap`. Rows are checked as they are read,
    not up front; exact per-epoch counts need map-style data (`build_instruction_mixture`). See
    `StreamingInstructionMixture` for several processes and DataLoader workers.

    Example:
        >>> mixture = build_streaming_mixture(
        ...     [MixtureSource("vqa", load_dataset("HuggingFaceM4/VQAv2", split="train", streaming=True),
        ...                    task="vqav2", columns={"answer": "answers"}),
        ...      MixtureSource("coco", "coco.jsonl", task="coco_caption")],
        ...     probabilities={"vqa": 0.7, "coco": 0.3}, processor=processor, decoder_only=True)
        >>> trainer = InstructBlipTrainer(model, TrainingArguments(..., max_steps=1000),
        ...                               train_dataset=mixture.dataset, data_collator=mixture.collator)
    """
    dataset = StreamingInstructionMixture(sources, probabilities=probabilities, alpha=alpha, multipliers=multipliers,
                                          size_cap=size_cap, seed=seed)
    return InstructionMixture(dataset=dataset, sampler=None, collator=mixture_collator(processor, decoder_only,
                                                                               collator_kwargs))
