"""Data-parallel evaluation: one process per device under `torchrun` / `accelerate launch`, one predictions file.

Every process reads the rows written so far (the predictions file and any part files), the pending examples are cut
into batches exactly as one process cuts them, and process r of W computes batches r, r + W, r + 2W, ... So every
batch holds the examples it holds in a one-process run, and gets the same rows. Process r appends to its own part
file, `NAME.part{r}-of-{W}.jsonl` (a rerun resumes it, with any number of processes); at the end the main process
appends the new rows to `NAME.jsonl` in example order, which makes it the file one process writes, and deletes the
parts. The processes only synchronise at the start (everyone has read before anyone appends) and at the end.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch.distributed as dist

T = TypeVar("T")


def part_path(path: Path, rank: int, world_size: int) -> Path:
    """Process `rank`'s predictions file next to `path`: `NAME.part{rank}-of-{world_size}.jsonl`."""
    return path.with_name(f"{path.stem}.part{rank}-of-{world_size}{path.suffix}")


def part_files(path: Path) -> list[Path]:
    """The part files of `path` that exist, left by any number of processes."""
    return sorted(path.parent.glob(f"{glob.escape(path.stem)}.part*-of-*{glob.escape(path.suffix)}"))


@dataclass(frozen=True)
class Processes:
    """This process's `rank` among `world_size` evaluation processes (one by default).

    Example:
        >>> Processes(rank=1, world_size=2).take(["b0", "b1", "b2", "b3"])
        ['b1', 'b3']
    """

    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        valid = all(isinstance(v, int) and not isinstance(v, bool) for v in (self.rank, self.world_size))
        if not (valid and 0 <= self.rank < self.world_size):
            raise ValueError(f"expected 0 <= `rank` < `world_size`, found rank {self.rank!r}, "
                             f"world_size {self.world_size!r}.")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def take(self, batches: Sequence[T]) -> list[T]:
        """This process's batches: `rank`, `rank + world_size`, ..."""
        return list(batches[self.rank :: self.world_size])

    def own_path(self, path: Path) -> Path:
        """Where this process appends its rows: `path` itself when it is alone."""
        return path if self.world_size == 1 else part_path(path, self.rank, self.world_size)

    def others(self, path: Path) -> list[Path]:
        """The other processes' part files (their rows count towards the progress shown)."""
        return [part_path(path, r, self.world_size) for r in range(self.world_size) if r != self.rank]

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def share(self, value: Any) -> Any:
        """The main process's `value`, on every process."""
        if self.world_size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def launched_processes() -> Processes:
    """The processes `torchrun` / `accelerate launch` started (`RANK`, `WORLD_SIZE` in the environment), else one.

    Joins their process group when none is up yet, over gloo: it only carries two barriers and one broadcast, and
    works beside any device.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return Processes()
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return Processes(dist.get_rank(), dist.get_world_size())


class RowCounter:
    """Counts the complete rows appended to `paths` (other processes' part files) since the last call, reading only
    the new bytes: the progress bar shows the count over all processes."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.offsets = {path: path.stat().st_size if path.exists() else 0 for path in paths}

    def new_rows(self) -> int:
        count = 0
        for path, offset in self.offsets.items():
            if not path.exists():
                continue
            with path.open("rb") as handle:
                handle.seek(offset)
                data = handle.read()
            complete = data.rfind(b"\n") + 1  # a row counts once its newline is written
            count += data.count(b"\n", 0, complete)
            self.offsets[path] = offset + complete
        return count


def merge_parts(
    path: Path, order: Sequence[str], read: Callable[[Path], dict[str, dict]],
    append: Callable[[Path, list[dict]], None],
) -> bool:
    """Append to `path` the part files' rows it lacks, those of the ids in `order` first and in that order, then
    delete the part files; returns whether there were any. A rerun after a kill between the two finds the rows in
    `path` and appends nothing twice."""
    parts = part_files(path)
    if not parts:
        return False
    merged, rows = read(path), {}
    for part in parts:
        rows.update(read(part))
    known = set(order)
    new = [key for key in order if key in rows and key not in merged]
    new += [key for key in rows if key not in merged and key not in known]  # rows of other data: kept too
    append(path, [rows[key] for key in new])
    for part in parts:
        part.unlink()
    return True
