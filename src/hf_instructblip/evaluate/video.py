"""Video records for the held-out video QA tasks (MSVD-QA, MSRVTT-QA, iVQA).

A record carries `video` instead of `image`: a list of frame image paths in time order, or a folder of frames
(sorted by name, numbers compared as numbers). Paths are resolved and checked when the records are read; the
processor (`InstructBlipVideoProcessor`) samples `num_frames` of them uniformly (4, the paper's setting).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..model.processing_video import list_frames
from ..templates import CATEGORIES, visual_field

VIDEO_TASKS: frozenset[str] = frozenset(CATEGORIES["video_question_answering"])


def resolve_video(value: Any, root: str | os.PathLike | None, where: str) -> list[str]:
    """A record's `video` (frame paths or a folder, relative to `root`) -> existing frame paths in time order.

    Example:
        >>> resolve_video("clips/0001", "/data/msvd", "record 1")[:2]
        ['/data/msvd/clips/0001/00001.jpg', '/data/msvd/clips/0001/00002.jpg']
    """
    def full(path: str) -> Path:
        return Path(root, path) if root is not None else Path(path)

    if isinstance(value, (str, os.PathLike)):
        folder = full(value)
        if not folder.is_dir():
            raise ValueError(f"{where}: expected 'video' to be a folder of frames or a list of frame paths, found "
                             f"{str(value)!r}, which is not a folder (decode video files to frames first).")
        return [str(p) for p in list_frames(folder, where=f"{where} 'video'")]
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{where}: expected 'video' to be a folder of frames or a non-empty list of frame paths, "
                         f"found {value!r}.")
    frames = [full(v) for v in value]
    missing = [str(p) for p in frames if not p.is_file()]
    if missing:
        raise ValueError(f"{where}: {len(missing)} frame file(s) of 'video' do not exist, e.g. {missing[0]!r}.")
    return [str(p) for p in frames]


def check_video_processor(processor: Any, task: str) -> None:
    """Video tasks need a processor that reads clips (and so a video model)."""
    if not hasattr(processor, "load_clips"):
        raise TypeError(f"Task {task!r} takes video records: pass an InstructBlipVideoProcessor and an "
                        f"InstructBlipVideoForConditionalGeneration, found {type(processor).__name__}.")


def video_frames(task: str, record: Mapping[str, Any], where: str) -> list[str] | None:
    """The frame paths of a video task's record (checked); None for image tasks, which refuse video records."""
    if task not in VIDEO_TASKS:
        if visual_field(record) == "video":
            raise ValueError(f"{where}: task {task!r} takes an 'image'; 'video' records are for the video tasks "
                             f"{sorted(VIDEO_TASKS)}.")
        return None
    if record.get("video") is None:
        raise ValueError(f"{where}: task {task!r} takes a 'video' (a folder of frames or a list of frame paths), "
                         f"found fields {sorted(record)}.")
    return resolve_video(record["video"], None, where)
