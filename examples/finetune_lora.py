"""LoRA on the LLM's attention projections + a trainable Q-Former, through `InstructBlipTrainer` (PEFT).

    python examples/finetune_lora.py                                  # embedded model + shapes data, offline
    python examples/finetune_lora.py --model Salesforce/instructblip-vicuna-7b --steps 1000 --rank 16

Recipe: `get_peft_model(model, LoraConfig(target_modules=<LLM q/k/v/o projections>))` freezes everything but the
adapter, then `freeze_for_instruction_tuning` unfreezes the Q-Former, queries and projection (in that order).
`trainer.save_model` writes the adapter (`adapter_model.safetensors`) and the trained weights outside it
(`instructblip_trainable.safetensors`). The script then loads a fresh base model, applies both, and checks that
its answers and logits match the fine-tuned model's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch.utils.data import ConcatDataset
from transformers import TrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parent))  # examples/shapes.py, when run from anywhere
import shapes  # noqa: E402

import hf_instructblip  # noqa: E402,F401  (registers the Auto classes)
from hf_instructblip import (  # noqa: E402
    InstructBlipDataCollator,
    InstructBlipTrainer,
    freeze_for_instruction_tuning,
    load_trainable_weights,
)

# Attention projections of the common LLM families: LLaMA / Vicuna / OPT (q_proj ...), T5 (q, k, v, o). The
# pattern is anchored at `language_model.` so the Q-Former's and the vision tower's layers are never matched.
LLM_ATTENTION = r".*language_model\..*\.(q_proj|k_proj|v_proj|o_proj|out_proj|q|k|v|o)"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint folder or Hub id (default: the embedded small model)")
    parser.add_argument("--output-dir", default="outputs/finetune_lora")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def load_base(model_id: str | None, seed: int):
    """`--model` through the Auto classes, or the embedded small model (deterministic in `seed`)."""
    if model_id:
        return shapes.load_checkpoint(model_id)
    processor = shapes.build_processor()
    return shapes.build_model(processor, seed=seed), processor


def with_lora(model, rank: int) -> PeftModel:
    """LoRA adapters on the LLM's attention projections, and the InstructBLIP trainable parts unfrozen."""
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=LLM_ATTENTION)
    peft_model = get_peft_model(model, config)
    table = freeze_for_instruction_tuning(peft_model)
    print(table)
    peft_model.print_trainable_parameters()
    return peft_model


def train(model, processor, args: argparse.Namespace, output_dir: Path) -> InstructBlipTrainer:
    tasks = ("colour", "shape", "caption")
    dataset = ConcatDataset([shapes.make_records(task, 64, args.seed + i) for i, task in enumerate(tasks)])
    decoder_only = model.get_base_model().config.use_decoder_only_language_model
    training_args = TrainingArguments(
        output_dir=str(output_dir / "trainer"), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate, lr_scheduler_type="cosine", weight_decay=0.0,
        logging_steps=max(1, args.steps // 10), save_strategy="no", report_to=[], seed=args.seed,
        dataloader_num_workers=0,
    )
    trainer = InstructBlipTrainer(model=model, args=training_args, train_dataset=dataset,
                                  data_collator=InstructBlipDataCollator(processor, decoder_only=decoder_only))
    trainer.train()
    return trainer


@torch.no_grad()
def logits(model, processor, records: list[dict]) -> torch.Tensor:
    inputs = processor(images=[r["image"] for r in records], text=[r["instruction"] for r in records],
                       return_tensors="pt")
    return model.eval()(**inputs).logits


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    output_dir = Path(args.output_dir)
    base, processor = load_base(args.model, args.seed)
    model = with_lora(base, args.rank)
    trainer = train(model, processor, args, output_dir)

    adapter_dir = output_dir / "adapter"
    trainer.save_model(str(adapter_dir))  # adapter_model.safetensors + instructblip_trainable.safetensors
    print(f"saved {sorted(p.name for p in adapter_dir.iterdir())} to {adapter_dir}")

    # Reload on a fresh base: the trained Q-Former first, then the adapter on top.
    fresh, _ = load_base(args.model, args.seed)
    load_trainable_weights(fresh, adapter_dir)
    reloaded = PeftModel.from_pretrained(fresh, adapter_dir)

    records = [r for i, task in enumerate(shapes.TASKS) for r in shapes.make_records(task, 2, args.seed + 50 + i)]
    answers = shapes.answer(model, processor, records)
    same = answers == shapes.answer(reloaded, processor, records) and torch.allclose(
        logits(model, processor, records), logits(reloaded, processor, records), atol=1e-5)
    for record, text in zip(records, answers):
        print(f"  {record['instruction']!r:40} -> {text!r} (label {record['answer']!r})")
    if not same:
        print("the reloaded adapter + Q-Former answer differently", file=sys.stderr)
        return 1
    print("reloaded adapter + trainable weights on a fresh base: answers and logits match")
    return 0


if __name__ == "__main__":
    sys.exit(main())
