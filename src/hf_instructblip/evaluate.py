"""Zero-shot evaluation runner: the paper's prompt per held-out task, generation or candidate ranking, metrics.

`evaluate(model, processor, records, task, ...)` runs one held-out task over records (dicts, e.g. from
`load_records`): it fills the task's evaluation prompt, then either generates a short answer / caption in
batches (left padded; the model moves an encoder-decoder LLM's padding to the row ends) or ranks each record's
candidate answers by log-likelihood (`rank_candidates`). Every batch is appended to a JSON-lines predictions
file and flushed, so an interrupted run loses nothing, and a rerun skips the ids already there. Metrics are
computed from the predictions file once every record has one.

Command line:
    python -m hf_instructblip.evaluate --model PATH --data FILE.jsonl --task NAME [--output-dir DIR]

Data file: one JSON object per line with `image` (a path, relative to the data file), `question` (or `text`),
and by task `answers` (list; VQA accuracy, captions), `answer` (exact match; the right candidate), `options` /
`candidates` (ranking) or `label` (0/1: HatefulMemes, VSR); `id` is optional (default: the line number).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .metrics import (
    cider_d,
    exact_match_accuracy,
    mean_reciprocal_rank,
    normalize_vqa_answer,
    roc_auc,
    vqa_accuracy,
)
from .ranking import REDUCTIONS, rank_candidates
from .templates import EVAL_PROMPT_SLOTS, EVAL_PROMPTS

_DATA = json.loads(resources.files(__package__).joinpath("instruction_data.json").read_text("utf-8"))
RANKING_DATASETS: frozenset[str] = frozenset(_DATA["candidate_ranking_datasets"]["datasets"])


def _generation_preset(name: str) -> dict[str, Any]:
    """A preset of `generation_defaults` as `generate` keywords: greedy beam search, so sampling-only settings
    (top_p, temperature) are dropped; LAVIS' `min_len` counts new tokens, hence `min_new_tokens`."""
    preset = dict(_DATA["generation_defaults"][name])
    preset["min_new_tokens"] = preset.pop("min_length")
    preset["do_sample"] = False
    for key in ("top_p", "temperature"):
        preset.pop(key, None)
    return preset


SHORT_ANSWER = _generation_preset("short_answer_vqa")  # beams 5, max 10 new tokens, min 1, length_penalty -1
CAPTION = _generation_preset("lavis_generate")  # beams 5, max 256 new tokens, min 1, repetition_penalty 1.5


@dataclass(frozen=True)
class TaskSpec:
    """How a held-out task is evaluated: `mode` "generate" or "rank", the metric, and the generation preset."""

    name: str
    mode: str
    metric: str
    generation: Mapping[str, Any] | None = None


# The paper's 13 held-out datasets. Metric names follow `held_out_metrics`; "accuracy" is spelled out per task.
TASKS: Mapping[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("nocaps", "generate", "cider", CAPTION),
        TaskSpec("flickr30k", "generate", "cider", CAPTION),
        TaskSpec("gqa", "generate", "exact_match", SHORT_ANSWER),
        TaskSpec("vsr", "generate", "exact_match", SHORT_ANSWER),
        TaskSpec("vizwiz", "generate", "vqa_accuracy", SHORT_ANSWER),
        TaskSpec("textvqa", "generate", "vqa_accuracy", SHORT_ANSWER),
        TaskSpec("ivqa", "generate", "ivqa_accuracy", SHORT_ANSWER),
        TaskSpec("iconqa", "rank", "accuracy"),
        TaskSpec("scienceqa", "rank", "accuracy"),
        TaskSpec("msvd_qa", "rank", "accuracy"),
        TaskSpec("msrvtt_qa", "rank", "accuracy"),
        TaskSpec("visdial", "rank", "mrr"),
        TaskSpec("hateful_memes", "rank", "roc_auc"),
    )
}
HATEFUL_CANDIDATES = ("no", "yes")  # index 1 = hateful; its log-odds is the AUC score


def task_spec(task: str) -> TaskSpec:
    if task not in TASKS:
        raise ValueError(f"`task` must be one of the held-out tasks {sorted(TASKS)}, found {task!r}.")
    return TASKS[task]


# --- data file ------------------------------------------------------------------------------------------

def load_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a JSON-lines data file: one object per line (blank lines skipped), `image` resolved against the
    file's folder, `id` defaulting to the 1-based line number. Malformed lines raise ValueError with their number.

    Example:
        >>> records = load_records("textvqa_val.jsonl")
        >>> records[0]["id"], records[0]["image"]
        (1, '/data/textvqa/images/0001.jpg')
    """
    path = Path(path)
    records, seen = [], {}
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                where = f"{path}, line {number}"
                raise ValueError(f"{where}: malformed JSON ({error.msg}, column {error.colno}).") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}, line {number}: expected a JSON object, found {type(record).__name__}.")
            if not isinstance(record.get("image"), str) or not record["image"]:
                found = record.get("image")
                raise ValueError(f"{path}, line {number}: expected an 'image' path (str), found {found!r}.")
            record["image"] = str(path.parent / record["image"])
            record.setdefault("id", number)
            key = _id_key(record["id"])
            if key in seen:
                raise ValueError(f"{path}, line {number}: id {record['id']!r} already used on line {seen[key]}.")
            seen[key] = number
            records.append(record)
    return records


def _id_key(value: Any) -> str:
    """Ids compare as strings: JSON keeps ints and strings apart, but a resumed run must match either."""
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise TypeError(f"a record's `id` must be a str or an int, found {type(value).__name__} {value!r}.")
    return str(value)


# --- one record -> prompt, candidates, reference --------------------------------------------------------

# Data fields that fill each prompt slot, first present wins ("text" is the question, or a meme's text).
_SLOT_FIELDS = {"question": ("question", "text"), "ocr_tokens": ("ocr_tokens", "text"),
                "options": ("options", "candidates"), "context": ("context",), "caption": ("caption", "text")}
_OPTIONAL_SLOTS = {("scienceqa", "context")}  # many ScienceQA questions come without a context


@dataclass
class Example:
    """A record made ready: its id, image (path or image), prompt, candidates (ranking) and reference."""

    id: Any
    image: Any
    prompt: str
    candidates: list[str] | None
    reference: Any


def _field(record: Mapping[str, Any], names: Sequence[str]) -> Any:
    for name in names:
        value = record.get(name)
        if value not in (None, "", [], ()):
            return value
    return None


def _slot_text(value: Any, where: str) -> str:
    """A slot value as text: a str as is, a list of strings joined by ", " (as the training templates do)."""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return ", ".join(value)
    raise TypeError(f"{where}: expected a str or a list of str, found {type(value).__name__} {value!r}.")


def build_prompt(task: str, record: Mapping[str, Any]) -> str:
    """The task's zero-shot evaluation prompt with its slots filled from `record`.

    Example:
        >>> build_prompt("gqa", {"question": "What is on the table?"})
        'Question: What is on the table? Short answer:'
    """
    values = []
    for slot in EVAL_PROMPT_SLOTS[task_spec(task).name]:
        value = _field(record, _SLOT_FIELDS[slot])
        if value is None and (task, slot) in _OPTIONAL_SLOTS:
            value = ""
        if value is None:
            raise ValueError(
                f"record {record.get('id')!r}: task {task!r} needs one of the fields {list(_SLOT_FIELDS[slot])} "
                f"for its prompt, found fields {sorted(record)}."
            )
        values.append(_slot_text(value, f"record {record.get('id')!r}, field for {slot!r}"))
    return EVAL_PROMPTS[task].format(*values)


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
    return _string_list(_field(record, ("candidates", "options")), f"{where} 'candidates' or 'options'")


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
        return _string_list(_field(record, ("answers", "captions")), f"{where} 'answers' or 'captions'")
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
    """Check every record before any model call, so a bad line fails the run at once, not hours in."""
    spec = task_spec(task)
    if isinstance(records, (str, Mapping)) or not isinstance(records, Sequence):
        raise TypeError(f"`records` must be a list of dicts, found {type(records).__name__}.")
    examples, seen = [], set()
    for index, record in enumerate(records):
        if not isinstance(record, Mapping):
            raise TypeError(f"`records[{index}]` must be a dict, found {type(record).__name__}.")
        record_id = record.get("id", index + 1)
        key = _id_key(record_id)
        if key in seen:
            raise ValueError(f"`records[{index}]`: id {record_id!r} is used twice.")
        seen.add(key)
        where = f"record {record_id!r}"
        if record.get("image") is None:
            raise ValueError(f"{where}: expected an 'image' (path or image), found fields {sorted(record)}.")
        candidates = _candidates(spec, record, where) if spec.mode == "rank" else None
        example = Example(id=record_id, image=record["image"], prompt=build_prompt(task, record),
                          candidates=candidates, reference=_reference(spec, record, candidates, where))
        if isinstance(example.image, (str, os.PathLike)) and not os.path.isfile(example.image):
            raise ValueError(f"{where}: image file {str(example.image)!r} does not exist.")
        examples.append(example)
    return examples


# --- predictions file -----------------------------------------------------------------------------------

def read_predictions(path: str | os.PathLike, task: str) -> dict[str, dict[str, Any]]:
    """Predictions already written, by id. A last line without its newline (the run was killed while writing) is
    removed from the file; a malformed line elsewhere, or one of another task, raises ValueError with its line
    number."""
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
    done = {}
    for number, raw in enumerate(data[:complete].split(b"\n")[:-1], start=1):
        try:
            row = json.loads(raw) if raw.strip() else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError(f"{path}, line {number}: malformed JSON in the predictions file.") from None
        if row is None:
            continue
        if not isinstance(row, dict) or "id" not in row:
            raise ValueError(f"{path}, line {number}: expected a prediction object with an 'id', found {raw[:80]!r}.")
        if row.get("task") != task:
            raise ValueError(f"{path}, line {number}: a prediction for task {row.get('task')!r}, not {task!r}; "
                             "write each task's predictions to its own file.")
        done[_id_key(row["id"])] = row
    return done


def _append(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("a", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        handle.flush()
        os.fsync(handle.fileno())


# --- running the model ----------------------------------------------------------------------------------

def _open_image(image: Any) -> Any:
    """A path -> RGB PIL image (read now, file closed); images in memory pass through to the processor."""
    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as opened:
            return opened.convert("RGB")
    return image


def _model_inputs(model, processor, batch: list[Example]) -> dict[str, torch.Tensor]:
    inputs = processor(images=[_open_image(e.image) for e in batch], text=[e.prompt for e in batch],
                       padding="longest", return_tensors="pt")
    device, dtype = model.device, model.dtype
    return {k: v.to(device, dtype) if k == "pixel_values" else v.to(device) for k, v in inputs.items()}


def _generate_batch(model, processor, batch: list[Example], generation: Mapping[str, Any]) -> list[dict]:
    inputs = _model_inputs(model, processor, batch)
    sequences = model.generate(**inputs, **generation)
    # Decoder-only LLMs echo the prompt ([B, L + new]); encoder-decoder ones return only the answer.
    echoed = inputs["input_ids"] if model.config.use_decoder_only_language_model else None
    texts = processor.post_process_generation(sequences, echoed)
    return [{"prediction": text} for text in texts]


def _rank_batch(model, processor, batch: list[Example], reduction: str, candidate_batch_size: int | None) -> list[dict]:
    inputs = _model_inputs(model, processor, batch)
    result = rank_candidates(model, **inputs, candidates=[e.candidates for e in batch], reduction=reduction,
                             tokenizer=processor.tokenizer, candidate_batch_size=candidate_batch_size)
    return [{"candidates": e.candidates, "scores": scores.tolist(), "best": order[0],
             "prediction": e.candidates[order[0]]}
            for e, scores, order in zip(batch, result.scores, result.ranking)]


def _batches(items: list[Example], size: int) -> Iterator[list[Example]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# --- metrics --------------------------------------------------------------------------------------------

def caption_tokens(text: str) -> list[str]:
    """Lower-cased words without punctuation, close to the PTB tokenisation COCO's CIDEr runs on."""
    return re.findall(r"[a-z0-9]+(?:'[a-z]+)?", text.lower())


def ivqa_example_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """iVQA (Yang et al., 2021): min(#annotators who gave the prediction / 2, 1), after VQA normalisation."""
    matches = sum(normalize_vqa_answer(a) == normalize_vqa_answer(prediction) for a in answers)
    return min(matches / 2, 1.0)


def compute_metric(task: str, examples: Sequence[Example], predictions: Sequence[Mapping[str, Any]]) -> float:
    """The task's metric over `examples` and their predictions (rows of the predictions file), in order."""
    metric = task_spec(task).metric
    references = [e.reference for e in examples]
    texts = [p["prediction"] for p in predictions]
    if metric == "vqa_accuracy":
        return vqa_accuracy(texts, references)
    if metric == "ivqa_accuracy":
        return float(np.mean([ivqa_example_accuracy(t, r) for t, r in zip(texts, references)]))
    if metric == "exact_match":
        return exact_match_accuracy(texts, references)
    if metric == "cider":
        return cider_d(texts, references, tokenize=caption_tokens).score
    if metric == "accuracy":
        return float(np.mean([p["best"] == r for p, r in zip(predictions, references)]))
    if metric == "mrr":
        return mean_reciprocal_rank([p["scores"] for p in predictions], references)
    if metric == "roc_auc":  # score = log p(hateful) - log p(not hateful)
        return roc_auc(references, [p["scores"][1] - p["scores"][0] for p in predictions])
    raise ValueError(f"unknown metric {metric!r} for task {task!r}")  # TASKS and this function disagree


# --- the runner -----------------------------------------------------------------------------------------

def _check_positive(name: str, value: Any, allow_none: bool = False) -> None:
    if allow_none and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive int{' or None' if allow_none else ''}, found {value!r}.")


@torch.no_grad()
def evaluate(
    model,
    processor,
    records: Sequence[Mapping[str, Any]],
    task: str,
    *,
    predictions_path: str | os.PathLike,
    metrics_path: str | os.PathLike | None = None,
    batch_size: int = 8,
    limit: int | None = None,
    generation_kwargs: Mapping[str, Any] | None = None,
    reduction: str = "sum",
    candidate_batch_size: int | None = None,
    progress: bool = True,
    on_batch: Callable[[int, list[dict[str, Any]]], None] | None = None,
) -> dict[str, Any]:
    """Evaluate `model` zero-shot on one held-out `task` and return (and optionally write) its metrics.

    Records whose id is already in `predictions_path` are skipped (resume); new predictions are appended and
    flushed after every batch. `generation_kwargs` override the task's generation preset; `reduction` and
    `candidate_batch_size` go to `rank_candidates`. `limit` keeps the first records only. `on_batch(index, rows)`
    is called after each batch is written (progress reporting; tests use it to interrupt a run).

    Example:
        >>> model = AutoModel.from_pretrained(path).eval(); processor = AutoProcessor.from_pretrained(path)
        >>> evaluate(model, processor, load_records("gqa.jsonl"), "gqa", predictions_path="gqa_predictions.jsonl")
        {'task': 'gqa', 'metric': 'exact_match', 'score': 0.49, 'num_examples': 12578, ...}
    """
    spec = task_spec(task)
    _check_positive("batch_size", batch_size)
    _check_positive("limit", limit, allow_none=True)
    _check_positive("candidate_batch_size", candidate_batch_size, allow_none=True)
    if reduction not in REDUCTIONS:
        raise ValueError(f"`reduction` must be one of {REDUCTIONS}, found {reduction!r}.")
    if generation_kwargs is not None and not isinstance(generation_kwargs, Mapping):
        raise TypeError(f"`generation_kwargs` must be a dict or None, found {type(generation_kwargs).__name__}.")
    examples = prepare_examples(task, records[:limit] if limit is not None else records)
    if not examples:
        raise ValueError("`records` is empty: there is nothing to evaluate.")
    predictions_path = Path(predictions_path)
    predictions_path.parent.mkdir(parents=True, exist_ok=True)
    done = read_predictions(predictions_path, task)
    pending = [e for e in examples if _id_key(e.id) not in done]
    generation = {**(spec.generation or {}), **(generation_kwargs or {})}

    model.eval()
    with tqdm(total=len(examples), initial=len(examples) - len(pending), desc=f"{task}", unit="ex",
              disable=not progress) as bar:
        for index, batch in enumerate(_batches(pending, batch_size)):
            if spec.mode == "generate":
                outputs = _generate_batch(model, processor, batch, generation)
            else:
                outputs = _rank_batch(model, processor, batch, reduction, candidate_batch_size)
            rows = [{"id": e.id, "task": task, "prompt": e.prompt, **out} for e, out in zip(batch, outputs)]
            _append(predictions_path, rows)
            done.update((_id_key(row["id"]), row) for row in rows)
            bar.update(len(batch))
            if on_batch is not None:
                on_batch(index, rows)

    score = compute_metric(task, examples, [done[_id_key(e.id)] for e in examples])
    settings = {"generation": generation} if spec.mode == "generate" else {"reduction": reduction}
    metrics = {"task": task, "mode": spec.mode, "metric": spec.metric, "score": score,
               "num_examples": len(examples), "predictions": str(predictions_path), **settings}
    if metrics_path is not None:
        _write_json(Path(metrics_path), metrics)
    return metrics


def _write_json(path: Path, payload: Mapping[str, Any]) -> None:
    """Write via a temporary file and rename, so a reader never sees half a metrics file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    temporary.replace(path)


# --- command line ---------------------------------------------------------------------------------------

DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m hf_instructblip.evaluate",
                                     description="Zero-shot InstructBLIP evaluation on one held-out task.")
    parser.add_argument("--model", required=True, help="model folder or Hub id (model + processor)")
    parser.add_argument("--data", required=True, type=Path, help="JSON-lines data file")
    parser.add_argument("--task", required=True, choices=sorted(TASKS))
    parser.add_argument("--output-dir", type=Path, default=Path("eval_results"),
                        help="gets TASK_predictions.jsonl (resumed if present) and TASK_metrics.json")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first LIMIT records only")
    parser.add_argument("--num-beams", type=int, default=None, help="override the task's preset")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="override the task's preset")
    parser.add_argument("--reduction", choices=REDUCTIONS, default="sum", help="candidate ranking score")
    parser.add_argument("--candidate-batch-size", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="auto")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # Our classes by name: the official Salesforce repos say `model_type: instructblip`, which the Auto classes map
    # to transformers' own InstructBLIP.
    from .modeling import InstructBlipForConditionalGeneration
    from .processing import InstructBlipProcessor

    try:  # check the data before the (slow) model load; a bad line is reported with its number
        records = load_records(args.data)
        prepare_examples(args.task, records[: args.limit])
    except (OSError, ValueError, TypeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    model = InstructBlipForConditionalGeneration.from_pretrained(args.model, dtype=DTYPES[args.dtype])
    model = model.to(args.device).eval()
    processor = InstructBlipProcessor.from_pretrained(args.model)
    overrides = {k: v for k, v in (("num_beams", args.num_beams), ("max_new_tokens", args.max_new_tokens))
                 if v is not None}
    metrics = evaluate(
        model, processor, records, args.task,
        predictions_path=args.output_dir / f"{args.task}_predictions.jsonl",
        batch_size=args.batch_size, limit=args.limit, generation_kwargs=overrides, reduction=args.reduction,
        candidate_batch_size=args.candidate_batch_size, progress=not args.no_progress,
    )
    metrics["model"] = args.model
    _write_json(args.output_dir / f"{args.task}_metrics.json", metrics)
    print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
