"""Run a converter: official files -> our JSON-lines records, with a progress bar, a summary and a check that every
written record is one the runner accepts (`tasks.prepare_examples`).

    python -m hf_instructblip.evaluate.prepare --dataset gqa --annotations testdev_balanced_questions.json \\
        --images gqa/images --output data/gqa.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from transformers.utils import logging as hf_logging

from ...templates import HELD_OUT
from ..tasks import prepare_examples
from ..video import VIDEO_TASKS, resolve_video
from . import captions, choice, classification, video, visdial, vqa
from .common import Conversion, Paths, Skip
from .sources import SOURCES

CONVERTERS: Mapping[str, Callable[..., Conversion]] = MappingProxyType({
    "nocaps": captions.nocaps, "flickr30k": captions.flickr30k,
    "gqa": vqa.gqa, "textvqa": vqa.textvqa, "vizwiz": vqa.vizwiz,
    "vsr": classification.vsr, "hateful_memes": classification.hateful_memes,
    "iconqa": choice.iconqa, "scienceqa": choice.scienceqa,
    "visdial": visdial.visdial,
    "msvd_qa": video.msvd_qa, "msrvtt_qa": video.msrvtt_qa, "ivqa": video.ivqa,
})
assert set(CONVERTERS) == set(HELD_OUT) == set(SOURCES), "one converter and one source entry per held-out task"


@dataclass
class PrepareSummary:
    """What a conversion wrote: the record count and the items left out, by reason."""

    dataset: str
    output: str
    written: int
    skipped: Counter

    def __str__(self) -> str:
        left_out = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items())) or "none"
        return f"{self.dataset}: wrote {self.written} records to {self.output} (left out: {left_out})"


def _check_loadable(dataset: str, records: list[dict[str, Any]], out_dir: Path) -> None:
    """The records as `tasks.load_records` will hand them to the runner (paths resolved) pass its checks."""
    resolved = []
    for record in records:
        record = dict(record)
        if dataset in VIDEO_TASKS:
            record["video"] = resolve_video(record["video"], out_dir, f"record {record['id']!r}")
        else:
            record["image"] = str(out_dir / record["image"])
        resolved.append(record)
    prepare_examples(dataset, resolved)


def prepare_dataset(dataset: str, annotations: str | os.PathLike, images: str | os.PathLike,
                    output: str | os.PathLike, *, progress: bool = True, **extra: Any) -> PrepareSummary:
    """Convert one held-out dataset's official `annotations` (+ `extra` files: `ocr`, `answer_list`, `mapping`)
    and `images` root into the records file `output`. Nothing is written when an item is malformed.

    Example:
        >>> print(prepare_dataset("gqa", "testdev_balanced_questions.json", "gqa/images", "data/gqa.jsonl"))
        gqa: wrote 12578 records to data/gqa.jsonl (left out: none)
    """
    if dataset not in CONVERTERS:
        raise ValueError(f"`dataset` must be one of {sorted(CONVERTERS)}, found {dataset!r}.")
    if not Path(annotations).is_file():
        raise ValueError(f"--annotations: {str(annotations)!r} is not a file.")
    for option, path in extra.items():
        if path is not None and not Path(path).is_file():
            raise ValueError(f"--{option.replace('_', '-')}: {str(path)!r} is not a file.")
    output = Path(output)
    conversion = CONVERTERS[dataset](annotations, Paths(images, output), **extra)
    records, skipped = [], Counter()
    for index, item in enumerate(hf_logging.tqdm(conversion.items, desc=f"converting {dataset}",
                                                 disable=not progress)):
        try:
            records.append(conversion.convert(index, item))
        except Skip as reason:
            skipped[str(reason)] += 1
    if not records:
        raise ValueError(f"{annotations}: no {dataset} record to write (left out: {dict(skipped)}); is it the file "
                         f"{SOURCES[dataset].annotations!r}?")
    output.parent.mkdir(parents=True, exist_ok=True)  # before the check: "out/../images" needs "out" to exist
    _check_loadable(dataset, records, output.resolve().parent)
    partial = output.with_name(output.name + ".partial")  # a crash leaves no half-written data file behind
    with open(partial, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(partial, output)
    return PrepareSummary(dataset, str(output), len(records), skipped)


def describe_sources() -> str:
    """The `--list` text: every dataset with the split and files its converter expects."""
    lines = []
    for name in HELD_OUT:
        src = SOURCES[name]
        lines.append(f"{name}: {src.split}\n  --annotations {src.annotations}\n  --images {src.images}")
        lines.extend(f"  {option} {what}" for option, what in src.extra.items())
        lines.append(f"  source: {src.source}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hf_instructblip.evaluate.prepare",
                                     description="Convert a held-out dataset's official files to evaluation records.")
    parser.add_argument("--list", action="store_true", help="list the datasets and the files each expects")
    parser.add_argument("--dataset", choices=list(HELD_OUT))
    parser.add_argument("--annotations", help="the official annotation file (see --list)")
    parser.add_argument("--images", help="the images (or frame folders) root")
    parser.add_argument("--output", help="the JSON-lines file to write (image paths relative to it)")
    parser.add_argument("--ocr", help="textvqa: the Rosetta OCR file")
    parser.add_argument("--answer-list", help="msvd_qa, msrvtt_qa: the answer vocabulary to rank")
    parser.add_argument("--mapping", help="msvd_qa: youtube_mapping.txt")
    args = parser.parse_args(argv)
    if args.list:
        print(describe_sources())
        return 0
    missing = [f"--{n}" for n in ("dataset", "annotations", "images", "output") if getattr(args, n) is None]
    if missing:
        parser.error(f"{', '.join(missing)} required (or --list)")
    extra = {k: getattr(args, k) for k in ("ocr", "answer_list", "mapping") if getattr(args, k) is not None}
    try:
        summary = prepare_dataset(args.dataset, args.annotations, args.images, args.output, **extra)
    except (OSError, ValueError, TypeError) as error:  # bad files and records: one line naming them
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(summary)
    return 0
