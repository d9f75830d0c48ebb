"""`python -m hf_instructblip.evaluate`: one held-out task (`--task NAME --data FILE.jsonl`) or the paper's whole
zero-shot suite (`--suite paper --data-dir DIR`, see `evaluate.suite`).

Every argument, the data files and the predictions files are checked before the model loads. Under `torchrun` /
`accelerate launch` the processes share the examples (see `data_parallel`); `--device-map auto` spreads one process's
model over the visible devices.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..hub_ids import is_hub_id
from ..model.validation import check_int
from .data_parallel import Processes, launched_processes
from .paper import PAPER_LLMS
from .ranking import REDUCTIONS
from .runner import check_run_settings, evaluate, prepare_run, write_json
from .suite import SUITES, paper_llm_of, run_suite
from .tasks import TASKS, load_records
from .video import VIDEO_TASKS


def _positive_int(text: str) -> int:
    """argparse type: argparse turns the ValueError of a non-number into "invalid _positive_int value"."""
    try:
        return check_int("value", int(text))
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m hf_instructblip.evaluate",
                                     description="Zero-shot InstructBLIP evaluation: one held-out task, or a suite.")
    parser.add_argument("--model", required=True, help="model folder or Hub id 'owner/name' (model + processor)")
    parser.add_argument("--data", type=Path, help="JSON-lines data file (one task)")
    parser.add_argument("--task", choices=sorted(TASKS))
    parser.add_argument("--suite", choices=sorted(SUITES), help="every held-out task whose TASK.jsonl is in --data-dir")
    parser.add_argument("--data-dir", type=Path, help="with --suite: the prepared TASK.jsonl files")
    parser.add_argument("--paper-llm", choices=PAPER_LLMS, default=None,
                        help="with --suite: the paper's row to compare with (default: from the official model id)")
    parser.add_argument("--output-dir", type=Path, default=Path("eval_results"),
                        help="gets TASK_predictions.jsonl (resumed if present) and TASK_metrics.json")
    parser.add_argument("--batch-size", type=_positive_int, default=8)
    parser.add_argument("--limit", type=_positive_int, default=None, help="evaluate the first LIMIT records only")
    parser.add_argument("--num-beams", type=_positive_int, default=None, help="override the task's preset")
    parser.add_argument("--max-new-tokens", type=_positive_int, default=None, help="override the task's preset")
    parser.add_argument("--reduction", choices=REDUCTIONS, default="sum", help="candidate ranking score")
    parser.add_argument("--candidate-batch-size", type=_positive_int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="'cuda' under torchrun / accelerate launch: process r uses cuda:LOCAL_RANK")
    parser.add_argument("--device-map", choices=("auto",), default=None,
                        help="spread the model over every visible device (one process; replaces --device)")
    # Passed to `from_pretrained` as is: transformers reads "auto" and torch dtype names.
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def _check_args(args: argparse.Namespace, processes: Processes) -> None:
    """One task or one suite; `--model` an existing model folder or a Hub id; data where it should be."""
    if Path(args.model).is_dir() and not (Path(args.model) / "config.json").is_file():
        raise ValueError(f"`--model`: expected a saved model folder (with config.json), found {args.model!r} "
                         "without config.json.")
    if not Path(args.model).is_dir() and not is_hub_id(args.model):  # a mistyped local path is reported now
        raise ValueError(f"`--model`: expected an existing model folder or a Hub id 'owner/name', found "
                         f"{args.model!r}, which is neither.")
    if args.suite is None:
        if args.task is None or args.data is None or args.data_dir is not None:
            raise ValueError("expected `--task NAME --data FILE.jsonl` for one task, or `--suite paper --data-dir DIR`.")
        if not args.data.is_file():
            raise ValueError(f"`--data`: expected an existing JSON-lines file, found {str(args.data)!r}.")
    elif args.task is not None or args.data is not None or args.data_dir is None or not args.data_dir.is_dir():
        raise ValueError(f"`--suite {args.suite}` reads every TASK.jsonl of `--data-dir` (an existing folder): leave "
                         f"--task and --data out, found task={args.task!r}, data={args.data}, data_dir={args.data_dir}.")
    if args.output_dir.exists() and not args.output_dir.is_dir():
        raise ValueError(f"`--output-dir`: expected a folder, found the file {str(args.output_dir)!r}.")
    if args.device_map and processes.world_size > 1:
        raise ValueError(f"`--device-map auto` spreads one process's model over every visible device; found "
                         f"{processes.world_size} processes. Launch one, or leave it out to share the examples.")


def load_for(task: str, args: argparse.Namespace, processes: Processes) -> tuple[Any, Any]:
    """(model, processor) for `task`: the image classes, or the video ones for video QA (same checkpoints, read frame
    by frame). Our classes by name: official folders say `model_type: instructblip`, which the Auto classes would map
    to transformers' own InstructBLIP."""
    from ..model.modeling import InstructBlipForConditionalGeneration
    from ..model.modeling_video import InstructBlipVideoForConditionalGeneration
    from ..model.processing import InstructBlipProcessor
    from ..model.processing_video import InstructBlipVideoProcessor

    video = task in VIDEO_TASKS
    model_class = InstructBlipVideoForConditionalGeneration if video else InstructBlipForConditionalGeneration
    model = model_class.from_pretrained(args.model, dtype=args.dtype, device_map=args.device_map)
    model = (model if args.device_map else model.to(_device(args.device, processes))).eval()
    return model, (InstructBlipVideoProcessor if video else InstructBlipProcessor).from_pretrained(args.model)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point (`python -m hf_instructblip.evaluate --help`); returns the exit status.

    Example:
        >>> main(["--model", "Salesforce/instructblip-flan-t5-xl", "--data", "gqa.jsonl", "--task", "gqa"])
        0
    """
    args = _parser().parse_args(argv)
    processes = launched_processes()
    overrides = {k: v for k, v in (("num_beams", args.num_beams), ("max_new_tokens", args.max_new_tokens))
                 if v is not None}
    run = dict(batch_size=args.batch_size, limit=args.limit, generation_kwargs=overrides, reduction=args.reduction,
               candidate_batch_size=args.candidate_batch_size)
    # What a predictions file's rows depend on besides the records (checked when a run resumes).
    settings = {"model": args.model, "dtype": args.dtype, "generation": overrides, "reduction": args.reduction}
    try:  # everything before the (slow) model load; a bad line is reported with its number
        _check_args(args, processes)
        if args.suite is not None:
            return run_suite(args.data_dir, args.output_dir, _paper_llm(args), run, processes,
                             lambda task: load_for(task, args, processes), progress=not args.no_progress,
                             settings=settings)
        records = load_records(args.data)
        predictions = args.output_dir / f"{args.task}_predictions.jsonl"
        prepare_run(args.task, records, predictions, **run)
        check_run_settings(predictions, settings, write=processes.is_main)
    except (OSError, ValueError, TypeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    model, processor = load_for(args.task, args, processes)
    metrics = evaluate(model, processor, records, args.task, predictions_path=predictions,
                       progress=not args.no_progress, processes=processes, **run)
    if processes.is_main:
        metrics["model"] = args.model
        write_json(args.output_dir / f"{args.task}_metrics.json", metrics)
        print(json.dumps(metrics, indent=2))
    return 0


def _paper_llm(args: argparse.Namespace) -> str | None:
    """The paper row to compare with: `--paper-llm`, or the one of an official checkpoint id; both must agree."""
    official = paper_llm_of(args.model)
    if args.paper_llm and official and args.paper_llm != official:
        raise ValueError(f"`--paper-llm {args.paper_llm}` compares {args.model} (the paper's {official} row) with "
                         "another LLM's row; leave --paper-llm out or give the matching one.")
    return args.paper_llm or official


def _device(device: str, processes: Processes) -> str:
    """Data parallel on GPUs: each process of a node on its own one."""
    if device == "cuda" and processes.world_size > 1:
        return f"cuda:{os.environ.get('LOCAL_RANK', processes.rank)}"
    return device
