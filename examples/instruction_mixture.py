"""Several datasets, the paper's instruction templates and its sqrt-size balanced sampling, under `Trainer`.

    python examples/instruction_mixture.py                       # embedded model + three shapes datasets, offline
    python examples/instruction_mixture.py --model PATH_OR_ID --steps 200

Three sources built from the shapes world, each phrased with the paper's template family of its task
(`hf_instructblip.templates`):
- `shapes_vqa`     colour / shape questions as `{image, question, answer}` rows, task "vqav2" (VQA templates);
- `shapes_okvqa`   a small question set, task "okvqa", up-weighted x2 as the paper up-weights OKVQA;
- `shapes_caption` `{image, caption}` rows in a JSON-lines file with PNGs beside it, task "coco_caption".
`build_instruction_mixture` concatenates them, draws dataset d with probability ~ sqrt(size_d) x multiplier
(`BalancedConcatSampler`) and builds the collator; `InstructBlipTrainer` logs per-dataset sample counts, which the
script checks against the sampler's exact per-epoch counts.

The embedded model's word-level vocabulary only knows the shapes words, so template words outside it become
`<unk>` there; a real checkpoint's tokenizers cover them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from transformers import TrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parent))  # examples/shapes.py, when run from anywhere
import shapes  # noqa: E402

import hf_instructblip  # noqa: E402,F401  (registers the Auto classes)
from hf_instructblip import (  # noqa: E402
    InstructBlipTrainer,
    MixtureSource,
    build_instruction_mixture,
    freeze_for_instruction_tuning,
)

MULTIPLIERS = {"shapes_okvqa": 2.0}  # the paper adjusts some datasets by hand (OKVQA up, A-OKVQA down)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint folder or Hub id (default: the embedded small model)")
    parser.add_argument("--output-dir", default="outputs/instruction_mixture")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def question_rows(tasks: tuple[str, ...], count: int, seed: int) -> list[dict]:
    """`{image, question, answer}` rows: the templates wrap the question."""
    return [{"image": r["image"], "question": r["instruction"], "answer": r["answer"]}
            for i, task in enumerate(tasks) for r in shapes.make_records(task, count // len(tasks), seed + i)]


def caption_file(folder: Path, count: int, seed: int) -> Path:
    """A JSON-lines `{image, caption}` file with its PNGs beside it (image paths relative to the file)."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, record in enumerate(shapes.make_records("caption", count, seed)):
        record["image"].save(folder / f"images/{i:04d}.png")
        lines.append(json.dumps({"image": f"images/{i:04d}.png", "caption": record["answer"]}))
    path = folder / "captions.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def sources(output_dir: Path, seed: int) -> list[MixtureSource]:
    return [
        MixtureSource("shapes_vqa", question_rows(("colour", "shape"), 400, seed), task="vqav2"),
        MixtureSource("shapes_okvqa", question_rows(("shape",), 60, seed + 10), task="okvqa"),
        MixtureSource("shapes_caption", str(caption_file(output_dir / "captions", 120, seed + 20)),
                      task="coco_caption"),
    ]


def load(model_id: str | None, seed: int):
    if model_id:
        return shapes.load_checkpoint(model_id)
    processor = shapes.build_processor()
    return shapes.build_model(processor, seed=seed), processor


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    output_dir = Path(args.output_dir)
    model, processor = load(args.model, args.seed)
    mixture = build_instruction_mixture(
        sources(output_dir, args.seed), processor=processor,
        decoder_only=model.config.use_decoder_only_language_model, multipliers=MULTIPLIERS,
        num_samples=args.steps * args.batch_size, seed=args.seed,
    )
    for part in mixture.dataset.datasets:  # one rendered record per source: the paper's template families
        record = part[0]
        print(f"{record['dataset']:15} {record['instruction']!r} -> {record['answer']!r}")
    print(mixture.sampler.summary())

    freeze_for_instruction_tuning(model)
    training_args = TrainingArguments(
        output_dir=str(output_dir / "trainer"), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate, weight_decay=0.0, logging_steps=max(1, args.steps // 5),
        save_strategy="no", report_to=[], seed=args.seed, dataloader_num_workers=0,
    )
    trainer = InstructBlipTrainer(model=model, args=training_args, train_dataset=mixture.dataset,
                                  train_sampler=mixture.sampler, data_collator=mixture.collator)
    trainer.train()

    logs = [log for log in trainer.state.log_history if any(k.startswith("dataset/") for k in log)]
    seen = {name: int(logs[-1].get(f"dataset/{name}/samples", 0)) for name in mixture.sampler.names}
    print(f"samples seen per dataset after {logs[-1]['step']} steps: {seen}")
    expected = dict(zip(mixture.sampler.names, mixture.sampler.counts))
    if logs[-1]["step"] == args.steps and seen != expected:  # one full epoch of the sampler was consumed
        print(f"expected the sampler's per-epoch counts {expected}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
