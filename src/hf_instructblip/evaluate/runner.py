"""Zero-shot evaluation runner: the paper's prompt per held-out task, generation or candidate ranking, metrics.

`evaluate` fills each record's evaluation prompt, then generates (left padded batches) or ranks the candidate
answers (`rank_candidates`). Every batch is appended to a JSON-lines predictions file and flushed, so a rerun
skips the ids already there (rows made for another prompt or other candidates are refused, not reused); the
metric is computed from that file once every record has a row.

Several processes share the examples (`processes`, see `data_parallel`). The command line is `evaluate.cli`; a whole
held-out suite with the paper's table is `evaluate.suite`.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import BatchFeature

from ..json_lines import iter_json_lines
from ..model.images import load_image
from ..model.validation import check_choice, check_int
from .data_parallel import Processes, RowCounter, merge_parts, part_files
from .generation import evaluation_inputs, generate_answers
from .ranking import REDUCTIONS, rank_candidates
from .tasks import Example, TaskSpec, compute_metric, id_key, prepare_examples, task_spec
from .video import VIDEO_TASKS, check_video_processor

# The fields a predictions row needs, by mode: the metric reads them, the resume check compares prompt/candidates.
ROW_FIELDS = {"generate": ("id", "prompt", "prediction"),
              "rank": ("id", "prompt", "prediction", "candidates", "scores", "best")}


# --- predictions file -----------------------------------------------------------------------------------
def _check_row(row: Mapping[str, Any], task: str, mode: str, where: str) -> None:
    if row.get("task") != task:
        raise ValueError(f"{where}: a prediction for task {row.get('task')!r}, not {task!r}; "
                         "write each task's predictions to its own file.")
    missing = [field for field in ROW_FIELDS[mode] if field not in row]
    if missing:
        raise ValueError(f"{where}: a {mode!r} prediction row needs the fields {list(ROW_FIELDS[mode])}; "
                         f"missing {missing}, found {sorted(row)}.")
    if not isinstance(row["prediction"], str):
        raise ValueError(f"{where}: expected a 'prediction' string, found {row['prediction']!r}.")
    if mode != "rank":
        return
    scores, size = row["scores"], len(row["candidates"]) if isinstance(row["candidates"], list) else -1
    numbers = isinstance(scores, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in scores)
    if not (numbers and len(scores) == size and row["best"] in range(size)):
        raise ValueError(f"{where}: expected 'scores' (one number per candidate) and 'best' (a candidate index) "
                         f"for {row['candidates']!r}, found scores {row['scores']!r}, best {row['best']!r}.")


def read_predictions(path: str | os.PathLike, task: str) -> dict[str, dict[str, Any]]:
    """Predictions already written, by id. A cut-off last line (the run was killed while writing) is removed from
    the file; a malformed row elsewhere raises ValueError naming the file and line.

    Example:
        >>> read_predictions("eval_results/gqa_predictions.jsonl", "gqa")["1"]["prediction"]
        'yes'
    """
    path = Path(path)
    if not path.exists():
        return {}
    data = path.read_bytes()
    complete = data.rfind(b"\n") + 1  # a row counts once its newline is written
    if complete < len(data):  # killed mid-row (or between a row and its newline): drop the tail, recompute it
        with path.open("r+b") as handle:
            handle.truncate(complete)
        line = data.count(b"\n") + 1
        print(f"{path}: dropped a cut-off last line {line}; it is recomputed.", file=sys.stderr)
    mode, done = task_spec(task).mode, {}
    for number, row in iter_json_lines(path):
        where = f"{path}, line {number}"
        _check_row(row, task, mode, where)
        done[id_key(row["id"], where)] = row
    return done


def _check_unchanged(path: Path, done: Mapping[str, Mapping[str, Any]], examples: Sequence[Example]) -> None:
    """Refuse rows made for other data. Refusing, not recomputing: the file stays append-only, one row per id."""
    changed = [e.id for e in examples if (row := done.get(id_key(e.id))) is not None
               and (row["prompt"] != e.prompt or row.get("candidates") != e.candidates)]
    if changed:
        raise ValueError(f"{path}: {len(changed)} predictions were made for another prompt or other candidates "
                         f"than the records now give (ids {changed[:10]}); delete the file, or write to another "
                         "one, to recompute them.")


def _append(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("a", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        handle.flush()
        os.fsync(handle.fileno())


def write_json(path: Path, payload: Mapping[str, Any]) -> None:
    """Write via a temporary file and rename, so a reader never sees half a metrics file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    temporary.replace(path)


# --- running the model ----------------------------------------------------------------------------------
def example_inputs(model, processor, batch: list[Example]) -> BatchFeature:
    """The processor's tensors for a batch of examples: images loaded, or clips' frame paths (the processor samples
    and reads `num_frames` of them)."""
    prompts = [e.prompt for e in batch]
    if batch[0].video is not None:
        return evaluation_inputs(model, processor, prompts, videos=[e.video for e in batch])
    return evaluation_inputs(model, processor, prompts, images=[load_image(e.image) for e in batch])


def _generate_batch(model, processor, batch: list[Example], generation: Mapping[str, Any]) -> list[dict]:
    texts = generate_answers(model, processor, example_inputs(model, processor, batch), **generation)
    return [{"prediction": text} for text in texts]


def _rank_batch(model, processor, batch: list[Example], reduction: str, candidate_batch_size: int | None) -> list[dict]:
    inputs = example_inputs(model, processor, batch)
    result = rank_candidates(model, **inputs, candidates=[e.candidates for e in batch], reduction=reduction,
                             tokenizer=processor.tokenizer, candidate_batch_size=candidate_batch_size)
    return [{"candidates": e.candidates, "scores": scores.tolist(), "best": order[0],
             "prediction": e.candidates[order[0]]}
            for e, scores, order in zip(batch, result.scores, result.ranking)]


def check_run_settings(predictions_path: Path, settings: Mapping[str, Any], write: bool) -> None:
    """A predictions file resumes only under the model and settings that began it: they are kept beside it
    (`TASK_predictions.settings.json`, written when `write`), and a rerun with others is refused, not mixed in.

    Example:
        >>> check_run_settings(Path("out/gqa_predictions.jsonl"), {"model": "me/ckpt", "num_beams": 5}, write=True)
    """
    path = predictions_path.with_name(f"{predictions_path.stem}.settings.json")
    settings = json.loads(json.dumps(settings))  # as it reads back: tuples become lists
    if path.is_file():
        found = json.loads(path.read_text(encoding="utf-8"))
        if found != settings:
            raise ValueError(f"{predictions_path} was made with {found}, not {settings}; delete it and {path.name}, "
                             "or write to another output folder, to evaluate with these settings.")
    elif write:
        write_json(path, settings)


# --- the runner -----------------------------------------------------------------------------------------
def prepare_run(
    task: str, records: Sequence[Mapping[str, Any]], predictions_path: Path, *, batch_size: int, limit: int | None,
    generation_kwargs: Mapping[str, Any] | None, reduction: str, candidate_batch_size: int | None,
) -> tuple[TaskSpec, list[Example], dict[str, dict[str, Any]], dict[str, Any]]:
    """Everything checked before a model call: arguments, every record, the rows already in the predictions file."""
    spec = task_spec(task)
    check_int("batch_size", batch_size)
    check_int("limit", limit, allow_none=True)
    check_int("candidate_batch_size", candidate_batch_size, allow_none=True)
    check_choice("reduction", reduction, REDUCTIONS)
    if generation_kwargs is not None and not isinstance(generation_kwargs, Mapping):
        raise TypeError(f"`generation_kwargs` must be a dict or None, found {type(generation_kwargs).__name__}.")
    examples = prepare_examples(task, records[:limit] if limit is not None else records)
    if not examples:
        raise ValueError("`records` is empty: there is nothing to evaluate.")
    done = {}
    for path in (*part_files(predictions_path), predictions_path):  # parts: a data-parallel run not merged yet
        done.update(read_predictions(path, task))
    _check_unchanged(predictions_path, done, examples)
    return spec, examples, done, {**(spec.generation or {}), **(generation_kwargs or {})}


@torch.no_grad()
def evaluate(
    model, processor, records: Sequence[Mapping[str, Any]], task: str, *, predictions_path: str | os.PathLike,
    metrics_path: str | os.PathLike | None = None, batch_size: int = 8, limit: int | None = None,
    generation_kwargs: Mapping[str, Any] | None = None, reduction: str = "sum", candidate_batch_size: int | None = None,
    progress: bool = True, on_batch: Callable[[int, list[dict[str, Any]]], None] | None = None,
    processes: Processes | None = None,
) -> dict[str, Any]:
    """Evaluate `model` zero-shot on one held-out `task` and return (and optionally write) its metrics.

    Records whose id is already in `predictions_path` are skipped (resume). `generation_kwargs` override the task's
    generation preset; `reduction` and `candidate_batch_size` go to `rank_candidates`; `limit` keeps the first
    records only; `on_batch(index, rows)` is called after each batch is written. `processes` (e.g.
    `launched_processes()` under `torchrun`): every process calls this, computes its share of the batches and gets
    the metrics; the main process merges the predictions and writes the metrics file.

    Example:
        >>> model = AutoModel.from_pretrained(path).eval(); processor = AutoProcessor.from_pretrained(path)
        >>> evaluate(model, processor, load_records("gqa.jsonl"), "gqa", predictions_path="gqa_predictions.jsonl")
        {'task': 'gqa', 'metric': 'exact_match', 'score': 0.49, 'num_examples': 12578, ...}
    """
    predictions_path = Path(predictions_path)
    spec, examples, done, generation = prepare_run(
        task, records, predictions_path, batch_size=batch_size, limit=limit, generation_kwargs=generation_kwargs,
        reduction=reduction, candidate_batch_size=candidate_batch_size)
    if task in VIDEO_TASKS:
        check_video_processor(processor, task)
    predictions_path.parent.mkdir(parents=True, exist_ok=True)
    pending = [e for e in examples if id_key(e.id) not in done]
    processes = processes or Processes()
    batches = processes.take([pending[i : i + batch_size] for i in range(0, len(pending), batch_size)])
    others = RowCounter(processes.others(predictions_path))
    processes.barrier()  # every process has read the predictions before any appends

    model.eval()
    with tqdm(total=len(examples), initial=len(examples) - len(pending), desc=f"{task}", unit="ex",
              disable=not (progress and processes.is_main)) as bar:
        for index, batch in enumerate(batches):
            if spec.mode == "generate":
                outputs = _generate_batch(model, processor, batch, generation)
            else:
                outputs = _rank_batch(model, processor, batch, reduction, candidate_batch_size)
            rows = [{"id": e.id, "task": task, "prompt": e.prompt, **out} for e, out in zip(batch, outputs)]
            _append(processes.own_path(predictions_path), rows)
            done.update((id_key(row["id"]), row) for row in rows)
            bar.update(len(batch) + others.new_rows())  # the count over all processes
            if on_batch is not None:
                on_batch(index, rows)
        processes.barrier()  # every part file is complete
        bar.update(bar.total - bar.n)
    return processes.share(_finish(processes, task, spec, examples, done, predictions_path, metrics_path,
                                   {"generation": generation} if spec.mode == "generate" else {"reduction": reduction}))


def _finish(processes: Processes, task: str, spec: TaskSpec, examples: list[Example], done: dict[str, dict],
            predictions_path: Path, metrics_path: str | os.PathLike | None, settings: dict) -> dict | None:
    """On the main process: the part files merged into the predictions file, the metrics computed and written."""
    if not processes.is_main:
        return None
    if merge_parts(predictions_path, [id_key(e.id) for e in examples], lambda path: read_predictions(path, task),
                   _append):
        done = read_predictions(predictions_path, task)
    score = compute_metric(task, examples, [done[id_key(e.id)] for e in examples])
    metrics = {"task": task, "mode": spec.mode, "metric": spec.metric, "score": score,
               "num_examples": len(examples), "predictions": str(predictions_path), **settings}
    if metrics_path is not None:
        write_json(Path(metrics_path), metrics)
    return metrics
