"""Quick start (the main job): instruction-tune InstructBLIP's Q-Former on a procedural multi-task dataset, on CPU.

    python examples/quickstart.py                      # embedded small model, offline, ~40 s on 2 idle cores
    python examples/quickstart.py --model PATH_OR_ID   # the same recipe on a real checkpoint

Steps: build the embedded model (or load `--model`), give its frozen parts a short pretraining (embedded model
only, see examples/shapes.py for why), measure held-in / held-out accuracy, instruction-tune the Q-Former only with
`InstructBlipTrainer` + `BalancedConcatSampler` (sqrt-size mixture of three tasks), measure again, save, reload
with `AutoModel` / `AutoProcessor`, answer a few questions, and write a PNG of sample answers and the loss curve.
Exits non-zero if held-in accuracy after training is below 0.8.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import ConcatDataset
from transformers import AutoModel, AutoProcessor, TrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parent))  # examples/shapes.py, when run from anywhere
import shapes  # noqa: E402

import hf_instructblip  # noqa: E402,F401  (registers the Auto classes)
from hf_instructblip import (  # noqa: E402
    BalancedConcatSampler,
    InstructBlipDataCollator,
    InstructBlipTrainer,
    freeze_for_instruction_tuning,
)

TRAIN_SIZES = {"colour": 3000, "shape": 3000, "caption": 1000}  # unequal on purpose: the sampler balances them
EVAL_PER_TASK = 60
TARGET = 0.8


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint folder or Hub id to fine-tune instead of the embedded model")
    parser.add_argument("--output-dir", default="outputs/quickstart")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def load_or_build(args: argparse.Namespace):
    if args.model:
        return shapes.load_checkpoint(args.model)
    processor = shapes.build_processor()
    model = shapes.build_model(processor, seed=args.seed)
    started = time.time()
    losses = shapes.pretrain_frozen_parts(model, processor)
    print(f"pretrained the frozen parts in {time.time() - started:.0f}s (final losses {losses})")
    return model, processor


def evaluation_sets(seed: int) -> dict[str, list[dict]]:
    held_in = [r for i, task in enumerate(shapes.TASKS) for r in shapes.make_records(task, EVAL_PER_TASK, seed + 100 + i)]
    held_out = [r for i, task in enumerate(shapes.TASKS)
                for r in shapes.make_records(task, EVAL_PER_TASK, seed + 200 + i, held_out=True)]
    return {"held-in": held_in, "held-out": held_out}


def report(model, processor, sets: dict[str, list[dict]], when: str) -> dict[str, float]:
    scores = {name: shapes.accuracy(model, processor, records) for name, records in sets.items()}
    print(f"accuracy {when}: " + ", ".join(f"{name} {score:.3f}" for name, score in scores.items()))
    return scores


def train(model, processor, args: argparse.Namespace) -> list[tuple[int, float]]:
    """Q-Former-only instruction tuning on the sqrt-balanced task mixture; returns the (step, loss) curve."""
    datasets = [shapes.make_records(task, size, args.seed + i) for i, (task, size) in enumerate(TRAIN_SIZES.items())]
    mixture = ConcatDataset(datasets)
    sampler = BalancedConcatSampler(mixture, names=list(TRAIN_SIZES), seed=args.seed,
                                    num_samples=args.steps * args.batch_size)
    print(sampler.summary())
    print(freeze_for_instruction_tuning(model))
    collator = InstructBlipDataCollator(processor, decoder_only=model.config.use_decoder_only_language_model)
    training_args = TrainingArguments(
        output_dir=os.path.join(args.output_dir, "trainer"), per_device_train_batch_size=args.batch_size,
        num_train_epochs=1, learning_rate=args.learning_rate, lr_scheduler_type="cosine", warmup_steps=20,
        weight_decay=0.0, logging_steps=25, save_strategy="no", report_to=[], use_cpu=True, seed=args.seed,
        dataloader_num_workers=0, disable_tqdm=False,
    )
    trainer = InstructBlipTrainer(model=model, args=training_args, train_dataset=mixture, data_collator=collator,
                                  train_sampler=sampler)
    trainer.train()
    return [(log["step"], log["loss"]) for log in trainer.state.log_history if "loss" in log]


def plot(path: Path, samples: list[dict], answers: list[str], curve: list[tuple[int, float]]) -> None:
    """Sample images with instruction -> answer (held-in row, held-out row) beside the training loss curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = (len(samples) + 1) // 2
    figure = plt.figure(figsize=(3 * columns + 5, 5.5))
    grid = figure.add_gridspec(2, columns + 2)
    for i, (record, predicted) in enumerate(zip(samples, answers)):
        axis = figure.add_subplot(grid[i // columns, i % columns])
        axis.imshow(record["image"])
        axis.set_axis_off()
        verdict = "correct" if predicted == record["answer"] else f"expected: {record['answer']}"
        axis.set_title(f"{record['instruction']}\n-> {predicted or '(empty)'}\n{verdict}", fontsize=8)
    curve_axis = figure.add_subplot(grid[:, columns:])
    curve_axis.plot(*zip(*curve), marker="o", markersize=3)
    curve_axis.set(xlabel="step", ylabel="training loss (log scale)", yscale="log",
                   title="Q-Former-only instruction tuning")
    figure.suptitle("top: held-in templates, bottom: held-out templates")
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main() -> int:
    args = parse_args()
    torch.manual_seed(args.seed)
    output_dir = Path(args.output_dir)
    started = time.time()
    model, processor = load_or_build(args)
    sets = evaluation_sets(args.seed)
    print(f"chance: colour/shape 1/{len(shapes.COLOURS)}, caption 1/{len(shapes.COLOURS) * len(shapes.SHAPES)}")
    before = report(model, processor, sets, "before instruction tuning")
    curve = train(model, processor, args)
    after = report(model, processor, sets, "after instruction tuning")

    model_dir = output_dir / "model"
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    reloaded, reloaded_processor = AutoModel.from_pretrained(model_dir), AutoProcessor.from_pretrained(model_dir)
    samples = [sets[name][task * EVAL_PER_TASK] for name in sets for task in range(len(shapes.TASKS))]
    answers = shapes.answer(reloaded, reloaded_processor, samples)
    assert answers == shapes.answer(model, processor, samples), "reloaded model answers differently"
    for record, predicted in zip(samples, answers):
        print(f"  {record['instruction']!r:40} -> {predicted!r} (expected {record['answer']!r})")
    plot(output_dir / "quickstart.png", samples, answers, curve)
    print(f"saved {model_dir} and {output_dir / 'quickstart.png'} in {time.time() - started:.0f}s total")
    print(f"held-in accuracy {before['held-in']:.3f} -> {after['held-in']:.3f} (target >= {TARGET}); "
          f"held-out {before['held-out']:.3f} -> {after['held-out']:.3f}")
    return 0 if after["held-in"] >= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
