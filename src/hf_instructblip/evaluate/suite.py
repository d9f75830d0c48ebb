"""The paper's zero-shot suite: every held-out task whose prepared data is present, each with its evaluation prompt
and preset (ranking where the paper ranks), then one table of our score beside the paper's for the same LLM.

`python -m hf_instructblip.evaluate --suite paper --model PATH --data-dir DIR` reads `DIR/TASK.jsonl` (written by
`python -m hf_instructblip.evaluate.prepare`) for each held-out task, checks all of them before the model loads,
and runs each through `runner.evaluate` (resumable, data parallel under `torchrun`). The output folder gets the
per-task predictions and metrics files, `paper_suite.md` and `paper_suite.csv` (the table: scores only, so a resumed
or a data-parallel run writes the same one) and `paper_suite_timing.json` (examples per second per task, this run).
Tasks without a data file are listed as skipped.
"""

from __future__ import annotations

import csv
import gc
import io
import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..templates import HELD_OUT
from .data_parallel import Processes
from .paper import PAPER_CHECKPOINTS, paper_zero_shot, to_paper_scale
from .runner import check_run_settings, evaluate, prepare_run, write_json
from .tasks import load_records, task_spec
from .video import VIDEO_TASKS

SUITES: Mapping[str, tuple[str, ...]] = {"paper": HELD_OUT}
COLUMNS = ("task", "metric", "examples", "ours", "paper", "difference", "status")


def paper_llm_of(model: str) -> str | None:
    """The paper row of an official checkpoint id ("Salesforce/instructblip-vicuna-7b" -> "vicuna-7b"), else None.

    Example:
        >>> paper_llm_of("Salesforce/instructblip-flan-t5-xl")
        'flan-t5-xl'
    """
    return next((llm for llm, checkpoint in PAPER_CHECKPOINTS.items() if str(model).rstrip("/") == checkpoint), None)


def _plan(data_dir: Path, output_dir: Path, run: Mapping[str, Any], settings: Mapping[str, Any] | None,
          write: bool) -> list[dict[str, Any]]:
    """Every held-out task with its records checked (or `skipped`), before any model is loaded."""
    plan = []
    for task in HELD_OUT:
        path = data_dir / f"{task}.jsonl"
        if not path.is_file():
            plan.append({"task": task, "skipped": f"no {path.name} in {data_dir}"})
            continue
        records = load_records(path)
        predictions = output_dir / f"{task}_predictions.jsonl"
        _, examples, done, _ = prepare_run(task, records, predictions, **run)
        if settings is not None:
            check_run_settings(predictions, settings, write)
        plan.append({"task": task, "records": records, "predictions": predictions,
                     "pending": len(examples) - len(done)})
    return plan


def _row(task: str, metrics: Mapping[str, Any] | None, paper_llm: str | None, skipped: str | None,
         limit: int | None = None) -> dict[str, Any]:
    """One table row: our score and the paper's on the paper's scale (percent, CIDEr x 100), rounded to 0.01."""
    paper = paper_zero_shot(task, paper_llm) if paper_llm else None
    ours = None if metrics is None else round(to_paper_scale(metrics["score"]), 2)
    difference = None if ours is None or paper is None else round(ours - paper, 2)
    status = f"skipped: {skipped}" if skipped else "done" if limit is None else f"done (first {limit} records)"
    return {"task": task, "metric": task_spec(task).metric, "examples": None if metrics is None else
            metrics["num_examples"], "ours": ours, "paper": paper, "difference": difference, "status": status}


def format_table(rows: list[dict[str, Any]], paper_llm: str | None) -> tuple[str, str]:
    """(Markdown, CSV) of the suite's rows.

    Example:
        >>> markdown, _ = format_table([{"task": "gqa", "metric": "exact_match", "examples": 12578, "ours": 49.1,
        ...                              "paper": 49.2, "difference": -0.1, "status": "done"}], "vicuna-7b")
    """
    cell = lambda value: "" if value is None else str(value)  # noqa: E731
    header = [*COLUMNS[:4], f"paper ({paper_llm or 'no LLM given'})", *COLUMNS[5:]]
    markdown = "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
                          *("| " + " | ".join(cell(row[c]) for c in COLUMNS) + " |" for row in rows)]) + "\n"
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([cell(row[c]) for c in COLUMNS] for row in rows)
    return markdown, buffer.getvalue()


def run_suite(data_dir: Path, output_dir: Path, paper_llm: str | None, run: Mapping[str, Any], processes: Processes,
              load: Callable[[str], tuple[Any, Any]], progress: bool = True,
              settings: Mapping[str, Any] | None = None) -> int:
    """Evaluate every prepared held-out task (see the module docstring); `load(task)` gives (model, processor), called
    once for the image tasks and once for the video tasks; `settings` (the model and generation settings) are kept
    beside each predictions file, and a resumed task made with others is refused. Returns the exit status (0)."""
    plan = _plan(Path(data_dir), Path(output_dir), run, settings, processes.is_main)
    rows, timing, loaded = [], {}, (None, None, None)  # loaded: (kind, model, processor)
    for item in plan:
        task = item["task"]
        if "skipped" in item:
            rows.append(_row(task, None, paper_llm, item["skipped"]))
            continue
        kind = "video" if task in VIDEO_TASKS else "image"
        if loaded[0] != kind:
            loaded = (None, None, None)
            gc.collect()  # the other kind's model goes before this one loads
            loaded = (kind, *load(task))
        start = time.perf_counter()
        metrics = evaluate(loaded[1], loaded[2], item["records"], task, predictions_path=item["predictions"],
                           metrics_path=Path(output_dir) / f"{task}_metrics.json", progress=progress,
                           processes=processes, **run)
        seconds = time.perf_counter() - start
        timing[task] = {"examples": item["pending"], "seconds": round(seconds, 3),
                        "examples_per_second": round(item["pending"] / seconds, 3) if item["pending"] else None}
        rows.append(_row(task, metrics, paper_llm, None, run.get("limit")))
    if processes.is_main:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        markdown, table = format_table(rows, paper_llm)
        (Path(output_dir) / "paper_suite.md").write_text(markdown, encoding="utf-8")
        (Path(output_dir) / "paper_suite.csv").write_text(table, encoding="utf-8")
        write_json(Path(output_dir) / "paper_suite_timing.json", timing)
        print(markdown + "\n" + json.dumps(timing, indent=2))
    return 0
