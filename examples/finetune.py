"""Fine-tune InstructBLIP's Q-Former with `Trainer` on a JSON-lines file of `{image, question, answer}` rows.

    python examples/finetune.py                                    # embedded model + a small shapes file, offline
    python examples/finetune.py --data train.jsonl --model Salesforce/instructblip-flan-t5-xl --steps 2000
    python examples/finetune.py --save-trainable-only              # save only the Q-Former delta
    accelerate launch --config_file examples/multi_gpu/fsdp.yaml examples/finetune.py --model ... --bf16  # README

Each line: `{"image": "images/0001.png", "question": "What colour is the car?", "answer": "red"}`; image paths are
relative to the file. The question is the instruction, verbatim. Recipe: `freeze_for_instruction_tuning` (image
encoder and LLM frozen), `InstructBlipDataCollator` (LAVIS token layout), `InstructBlipTrainer`. Saves the model
(or only the trained weights) and the processor to `<output-dir>/model`, reloads them and checks the answers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from torch.utils.data import Dataset
from transformers import AutoModel, AutoProcessor, TrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parent))  # examples/shapes.py, when run from anywhere
import shapes  # noqa: E402

import hf_instructblip  # noqa: E402,F401  (registers the Auto classes)
from hf_instructblip import (  # noqa: E402
    InstructBlipDataCollator,
    InstructBlipTrainer,
    freeze_for_instruction_tuning,
    load_trainable_weights,
)
from hf_instructblip.json_lines import read_json_lines  # noqa: E402
from hf_instructblip.model.images import load_image  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="JSON-lines {image, question, answer} file (default: write a shapes one)")
    parser.add_argument("--model", help="checkpoint folder or Hub id (default: the embedded small model)")
    parser.add_argument("--output-dir", default="outputs/finetune")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--save-trainable-only", action="store_true",
                        help="save only the trained weights (instructblip_trainable.safetensors)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bf16", action="store_true",
                        help="load the model in bfloat16, keep the trained weights in float32, train under autocast")
    return parser.parse_args(argv)


class QuestionAnswerFile(Dataset):
    """The rows of a `{image, question, answer}` JSON-lines file as collator records (images load lazily).

    Example:
        >>> QuestionAnswerFile("train.jsonl")[0].keys()
        dict_keys(['image', 'instruction', 'answer'])
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.rows = read_json_lines(self.path)
        for number, row in enumerate(self.rows, start=1):
            missing = {"image", "question", "answer"} - set(row)
            if missing:
                raise ValueError(f"{self.path}: row {number} lacks {sorted(missing)}; found fields {sorted(row)}.")

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        row = self.rows[index]
        return {"image": load_image(row["image"], self.path.parent), "instruction": row["question"],
                "answer": row["answer"]}


def write_shapes_file(folder: Path, count: int, seed: int) -> Path:
    """A JSON-lines file of shapes questions with PNG images beside it; returns its path."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    records = [r for i, task in enumerate(("colour", "shape")) for r in shapes.make_records(task, count // 2, seed + i)]
    lines = []
    for i, record in enumerate(records):
        name = f"images/{i:04d}.png"
        record["image"].save(folder / name)
        lines.append(json.dumps({"image": name, "question": record["instruction"], "answer": record["answer"]}))
    path = folder / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def load_base(model_id: str | None, seed: int, dtype: torch.dtype | None = None):
    """`--model` through the Auto classes (in `dtype`, if given), or the embedded small model (deterministic in
    `seed`)."""
    if model_id:
        return shapes.load_checkpoint(model_id, **({"dtype": dtype} if dtype is not None else {}))
    processor = shapes.build_processor()
    return shapes.build_model(processor, seed=seed), processor


def train(model, processor, dataset: Dataset, args: argparse.Namespace, output_dir: Path) -> InstructBlipTrainer:
    freeze_for_instruction_tuning(model, print_table=True)
    for param in model.parameters():  # with --bf16: fp32 master weights for what trains (FSDP2 needs one dtype)
        if param.requires_grad:
            param.data = param.data.float()
    collator = InstructBlipDataCollator(processor, decoder_only=model.config.use_decoder_only_language_model)
    training_args = TrainingArguments(
        output_dir=str(output_dir / "trainer"), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate, lr_scheduler_type="cosine", warmup_steps=min(10, args.steps // 10),
        weight_decay=0.0, logging_steps=max(1, args.steps // 10), save_strategy="no", report_to=[],
        seed=args.seed, dataloader_num_workers=0, bf16=args.bf16, use_cpu=not torch.cuda.is_available(),
    )
    trainer = InstructBlipTrainer(model=model, args=training_args, train_dataset=dataset, data_collator=collator,
                                  processing_class=processor, save_trainable_only=args.save_trainable_only)
    trainer.train()
    return trainer


def reload(model_dir: Path, args: argparse.Namespace):
    """The saved model: a full checkpoint, or the trained weights applied to a freshly loaded base."""
    if not args.save_trainable_only:
        return AutoModel.from_pretrained(model_dir), AutoProcessor.from_pretrained(model_dir)
    base, processor = load_base(args.model, args.seed)
    loaded = load_trainable_weights(base, model_dir)
    print(f"applied {len(loaded)} trained tensors from {model_dir} to the base model")
    return base, processor


@torch.no_grad()
def same_logits(model, reloaded, processor, records: list[dict]) -> bool:
    """Whether both models give the same training-layout logits on `records` (a stricter check than answers)."""
    batch = InstructBlipDataCollator(processor, decoder_only=model.config.use_decoder_only_language_model)(records)
    return torch.allclose(model.eval()(**batch).logits, reloaded.eval()(**batch).logits, atol=1e-5)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    output_dir = Path(args.output_dir)
    data = Path(args.data) if args.data else write_shapes_file(output_dir / "data", 64, args.seed)
    dataset = QuestionAnswerFile(data)
    print(f"{len(dataset)} examples from {data}")
    model, processor = load_base(args.model, args.seed, torch.bfloat16 if args.bf16 else None)
    if args.bf16:
        model.to(torch.bfloat16)  # the embedded model

    trainer = train(model, processor, dataset, args, output_dir)
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    print(f"training loss {losses[0]:.3f} -> {losses[-1]:.3f} over {trainer.state.global_step} steps")

    model_dir = output_dir / "model"
    trainer.save_model(str(model_dir))  # full model + processor, or instructblip_trainable.safetensors + processor
    if trainer.args.should_save:
        processor.save_pretrained(model_dir)
    if trainer.args.world_size > 1 or args.bf16:  # the reload check below: one process, one dtype
        print(f"saved to {model_dir}")
        return 0
    reloaded, reloaded_processor = reload(model_dir, args)
    records = [dataset[i] for i in range(min(6, len(dataset)))]
    answers = shapes.answer(model, processor, records)
    if answers != shapes.answer(reloaded, reloaded_processor, records) or not same_logits(model, reloaded,
                                                                                        processor, records):
        print("the reloaded model answers differently", file=sys.stderr)
        return 1
    for record, text in zip(records, answers):
        print(f"  {record['instruction']!r:40} -> {text!r} (label {record['answer']!r})")
    print(f"saved to {model_dir}; the reloaded model gives the same answers")
    return 0


if __name__ == "__main__":
    sys.exit(main())
