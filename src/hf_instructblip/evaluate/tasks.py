"""The held-out tasks (from the paper data in `templates`): how each is evaluated, records checked, metrics.

Data file: one JSON object per line with `image` (a path, relative to the data file), the prompt's fields (see
`templates.eval_prompt`), and by task `answers` (list; VQA accuracy, captions), `answer` (exact match; the right
candidate), `options` / `candidates` (ranking) or `label` (0/1: HatefulMemes, VSR); `id` is optional (default:
the line number). The video tasks (MSVD-QA, MSRVTT-QA, iVQA) take `video` instead of `image`: a folder of frames
or a list of frame paths (see `evaluate.video`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from ..json_lines import iter_json_lines
from ..templates import (
    HELD_OUT,
    HELD_OUT_METRICS,
    RANKING_DATASETS,
    category_of,
    eval_prompt,
    generation_preset,
    visual_field,
)
from .metrics import TEXT_METRICS, exact_match_accuracy, mean_reciprocal_rank, roc_auc
from .video import resolve_video, video_frames

HATEFUL_CANDIDATES = ("no", "yes")  # index 1 = hateful; its log-odds is the AUC score


@dataclass(frozen=True)
class TaskSpec:
    """How a held-out task is evaluated: `mode` "generate" or "rank", the metric, and the generation preset."""

    name: str
    mode: str
    metric: str
    generation: Mapping[str, Any] | None = None


def _task(name: str) -> TaskSpec:
    if name in RANKING_DATASETS:
        return TaskSpec(name, "rank", HELD_OUT_METRICS[name])
    preset = "lavis" if category_of(name) == "image_captioning" else "short"
    return TaskSpec(name, "generate", HELD_OUT_METRICS[name], MappingProxyType(generation_preset(preset)))


TASKS: Mapping[str, TaskSpec] = MappingProxyType({name: _task(name) for name in HELD_OUT})


def task_spec(task: str) -> TaskSpec:
    """The `TaskSpec` of a held-out task. Example: `task_spec("gqa").metric == "exact_match"`."""
    if task not in TASKS:
        raise ValueError(f"`task` must be one of the held-out tasks {sorted(TASKS)}, found {task!r}.")
    return TASKS[task]


def id_key(value: Any, where: str = "record") -> str:
    """Ids compare as strings: JSON keeps ints and strings apart, but a resumed run must match either."""
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise TypeError(f"{where}: `id` must be a str or an int, found {type(value).__name__} {value!r}.")
    return str(value)


def load_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a JSON-lines data file: `image` resolved against the file's folder, `id` defaulting to the 1-based
    line number. Errors name the line.

    Example:
        >>> load_records("/data/textvqa/val.jsonl")[0]["image"]
        '/data/textvqa/images/0001.jpg'
    """
    path = Path(path)
    records, lines = [], {}
    for number, record in iter_json_lines(path):
        where = f"{path}, line {number}"
        if visual_field(record) == "video":  # frames resolved against the file's folder too
            record["video"] = resolve_video(record["video"], path.parent, where)
        elif not isinstance(record.get("image"), str) or not record["image"]:
            raise ValueError(f"{where}: expected an 'image' path (str), found {record.get('image')!r}.")
        else:
            record["image"] = str(path.parent / record["image"])
        record.setdefault("id", number)
        key = id_key(record["id"], where)
        if key in lines:
            raise ValueError(f"{where}: id {record['id']!r} already used on line {lines[key]}.")
        lines[key] = number
        records.append(record)
    return records


# --- one record -> prompt, candidates, reference --------------------------------------------------------
@dataclass
class Example:
    """A record made ready: its id, image (path or image) or video (frame paths), prompt, candidates (ranking) and
    reference."""

    id: Any
    image: Any
    prompt: str
    candidates: list[str] | None
    reference: Any
    video: list[str] | None = None


def _string_list(value: Any, where: str) -> list[str]:
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not value \
            or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{where}: expected a non-empty list of non-empty strings, found {value!r}.")
    return list(value)


def _candidates(spec: TaskSpec, record: Mapping[str, Any], where: str) -> list[str]:
    if spec.name == "hateful_memes":
        candidates = _string_list(record.get("candidates") or list(HATEFUL_CANDIDATES), f"{where} 'candidates'")
        if len(candidates) != 2:
            raise ValueError(f"{where} 'candidates': hateful_memes ranks two answers (not, hateful), "
                             f"found {candidates!r}.")
        return candidates
    return _string_list(record.get("candidates") or record.get("options"), f"{where} 'candidates' or 'options'")


def _label(record: Mapping[str, Any], where: str) -> int:
    label = record.get("label")
    if label not in (0, 1) or isinstance(label, float):
        raise ValueError(f"{where}: expected a 'label' of 0 or 1, found {label!r}.")
    return int(label)


def _target_index(record: Mapping[str, Any], candidates: list[str], where: str) -> int:
    """The right candidate: `answer` as one of the candidate strings or as their index."""
    answer = record.get("answer")
    if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(candidates):
        return answer
    if isinstance(answer, str) and answer in candidates:
        return candidates.index(answer)
    raise ValueError(f"{where}: expected an 'answer' that is one of the candidates {candidates!r} "
                     f"(or its index), found {answer!r}.")


def _reference(spec: TaskSpec, record: Mapping[str, Any], candidates: list[str] | None, where: str) -> Any:
    """What the metric compares with: human answers, one answer, a candidate index or a 0/1 label."""
    if spec.metric in ("vqa_accuracy", "ivqa_accuracy"):
        return _string_list(record.get("answers"), f"{where} 'answers'")
    if spec.metric == "cider":
        return _string_list(record.get("answers") or record.get("captions"), f"{where} 'answers' or 'captions'")
    if spec.metric == "exact_match":
        answer = record.get("answer")
        if spec.name == "vsr" and answer is None:
            return ("false", "true")[_label(record, where)]
        if not isinstance(answer, str) or not answer:
            raise ValueError(f"{where}: expected an 'answer' string, found {answer!r}.")
        return answer
    if spec.metric == "roc_auc":
        return _label(record, where)
    return _target_index(record, candidates, where)  # accuracy, mrr


def prepare_examples(task: str, records: Sequence[Mapping[str, Any]]) -> list[Example]:
    """Check every record before any model call, so a bad line fails the run at once, not hours in.

    Example:
        >>> prepare_examples("gqa", [{"image": "a.png", "question": "Why?", "answer": "rain"}])[0].prompt
        'Question: Why? Short answer:'
    """
    spec = task_spec(task)
    if isinstance(records, (str, Mapping)) or not isinstance(records, Sequence):
        raise TypeError(f"`records` must be a list of dicts, found {type(records).__name__}.")
    examples, seen = [], set()
    for index, record in enumerate(records):
        if not isinstance(record, Mapping):
            raise TypeError(f"`records[{index}]` must be a dict, found {type(record).__name__}.")
        record_id = record.get("id", index + 1)
        key = id_key(record_id, f"`records[{index}]`")
        if key in seen:
            raise ValueError(f"`records[{index}]`: id {record_id!r} is used twice.")
        seen.add(key)
        where = f"record {record_id!r}"
        video = video_frames(task, record, where)  # None for the image tasks
        if video is None and record.get("image") is None:
            raise ValueError(f"{where}: expected an 'image' (path or image), found fields {sorted(record)}.")
        try:
            prompt = eval_prompt(task, record)
        except (ValueError, TypeError) as error:
            raise type(error)(f"{where}: {error}") from None
        candidates = _candidates(spec, record, where) if spec.mode == "rank" else None
        reference = _reference(spec, record, candidates, where)
        if video is None and isinstance(record["image"], (str, os.PathLike)) and not os.path.isfile(record["image"]):
            raise ValueError(f"{where}: image file {str(record['image'])!r} does not exist.")
        examples.append(Example(id=record_id, image=record.get("image"), prompt=prompt, candidates=candidates,
                                reference=reference, video=video))
    return examples


# --- metrics --------------------------------------------------------------------------------------------
def _texts(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    return [row["prediction"] for row in rows]


def _text_scorer(metric: str) -> Callable[[Sequence[Mapping[str, Any]], list], float]:
    return lambda rows, refs: TEXT_METRICS[metric](_texts(rows), refs)


# Metric name (as in `templates.HELD_OUT_METRICS`) -> score of the predictions-file rows against the references:
# generated texts through the one table `metrics.TEXT_METRICS`, ranked candidates from their scores.
SCORERS: Mapping[str, Callable[[Sequence[Mapping[str, Any]], list], float]] = MappingProxyType({
    **{metric: _text_scorer(metric) for metric in TEXT_METRICS},
    "accuracy": lambda rows, refs: exact_match_accuracy([row["best"] for row in rows], refs, normalize=None),
    "mrr": lambda rows, refs: mean_reciprocal_rank([row["scores"] for row in rows], refs),
    # score = log p(hateful) - log p(not hateful)
    "roc_auc": lambda rows, refs: roc_auc(refs, [row["scores"][1] - row["scores"][0] for row in rows]),
})


def compute_metric(task: str, examples: Sequence[Example], rows: Sequence[Mapping[str, Any]]) -> float:
    """The task's metric over `examples` and their predictions (rows of the predictions file), in order."""
    return SCORERS[task_spec(task).metric](rows, [e.reference for e in examples])
