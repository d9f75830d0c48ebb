"""BLIP-2's two pretraining stages, then instruction tuning, on the procedural shapes world (offline, CPU).

    python examples/pretrain_qformer.py                       # a few minutes on 2 CPU cores
    python examples/pretrain_qformer.py --stage1-steps 20 --stage2-steps 20 --tuning-steps 20 --vision-steps 50

1. The frozen parts get the short pretraining the shapes world needs (examples/shapes.py): the vision encoder
   learns shape and colour, the LLM learns to read a scene described in words.
2. Stage 1 (`QFormerForPretraining` + `QFormerPretrainingTrainer`): a new Q-Former (text feed-forward copied into
   the query feed-forward, as LAVIS starts from BERT) learns ITC + ITM + ITG on captions "<colour> <shape>",
   batches of the 16 distinct captions (duplicates would be false negatives for ITC and ITM).
   Reported: image -> text retrieval recall@1 among the 16 distinct captions (chance 1/16), by ITC similarity.
3. Stage 2 (`stage2_model`, `caption_records`, `InstructBlipTrainer`): the stage-1 folder + the LLM through
   `from_blip2` with `instruction_aware=False`; Q-Former, queries and projection learn to caption through the
   frozen LLM. Reported: caption loss on held-out images before and after. Exported to transformers'
   `Blip2ForConditionalGeneration` layout.
4. Instruction tuning (`instruction_aware=True`) on the shapes tasks; reported: held-in / held-out accuracy.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from transformers import TrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parent))  # examples/shapes.py, when run from anywhere
import shapes  # noqa: E402

from hf_instructblip import InstructBlipDataCollator, InstructBlipTrainer, freeze_for_instruction_tuning  # noqa: E402
from hf_instructblip.pretraining.collator import QFormerPretrainingCollator  # noqa: E402
from hf_instructblip.pretraining.configuration import QFormerPretrainingConfig  # noqa: E402
from hf_instructblip.pretraining.modeling import QFormerForPretraining  # noqa: E402
from hf_instructblip.pretraining.stage2 import caption_records, export_blip2, stage2_model  # noqa: E402
from hf_instructblip.pretraining.trainer import QFormerPretrainingTrainer  # noqa: E402

CAPTIONS = [f"{colour} {shape}" for colour, shape in itertools.product(shapes.COLOURS, shapes.SHAPES)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="outputs/pretrain_qformer")
    parser.add_argument("--vision-steps", type=int, default=300)
    parser.add_argument("--llm-steps", type=int, default=200)
    parser.add_argument("--stage1-steps", type=int, default=200)
    parser.add_argument("--stage2-steps", type=int, default=150)
    parser.add_argument("--tuning-steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--eval-size", type=int, default=160)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def caption_set(count: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    records = []
    for _ in range(count):
        colour, shape = str(rng.choice(list(shapes.COLOURS))), str(rng.choice(shapes.SHAPES))
        records.append({"image": shapes.draw_shape(colour, shape, rng), "caption": f"{colour} {shape}"})
    return records


class DistinctCaptionBlocks(torch.utils.data.IterableDataset):
    """Stage-1 records in blocks of the 16 distinct captions (fresh images each time): a batch of 16 then holds no
    duplicate caption, which ITC (one positive per row) and ITM (a negative that is not a positive) assume."""

    def __init__(self, count: int, seed: int):
        self.count, self.seed = count, seed

    def __iter__(self):
        rng = np.random.default_rng(self.seed)
        for start in range(0, self.count, len(CAPTIONS)):
            for index in rng.permutation(len(CAPTIONS))[: self.count - start]:
                colour, shape = CAPTIONS[index].split()
                yield {"image": shapes.draw_shape(colour, shape, rng), "caption": CAPTIONS[index]}


def qformer_tokenizer():
    """The shapes BERT tokenizer + `[DEC]`, BLIP-2's decoder start token, as the last vocabulary row."""
    tokenizer = shapes.qformer_tokenizer()
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    return tokenizer


def stage1_model(processor, tokenizer, seed: int) -> QFormerForPretraining:
    torch.manual_seed(seed)
    config = QFormerPretrainingConfig(
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           image_size=shapes.IMAGE_SIZE, patch_size=8, initializer_range=0.02),
        qformer_config=dict(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=128, cross_attention_frequency=1,
                            max_position_embeddings=shapes.QFORMER_POSITIONS, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0),
        num_query_tokens=shapes.NUM_QUERY_TOKENS, image_text_hidden_size=32)
    model = QFormerForPretraining(config)
    model.copy_text_ffn_to_queries()
    return model


def trainer_args(out: Path, steps: int, args: argparse.Namespace, lr: float, batch: int | None = None
                 ) -> TrainingArguments:
    return TrainingArguments(str(out), per_device_train_batch_size=batch or args.batch_size, max_steps=steps,
                             learning_rate=lr,
                             lr_scheduler_type="cosine", warmup_steps=min(20, steps // 10), weight_decay=0.0,
                             logging_steps=max(1, steps // 5), save_strategy="no", report_to=[], use_cpu=True,
                             seed=args.seed, dataloader_num_workers=0, disable_tqdm=True)


@torch.no_grad()
def recall_at_1(model: QFormerForPretraining, collator: QFormerPretrainingCollator, records: list[dict]) -> float:
    """Image -> text retrieval among the distinct captions, by the ITC similarity (max over queries)."""
    model.eval()
    texts = collator([{"image": records[0]["image"], "caption": c} for c in CAPTIONS])
    text_feat = model.text_features(texts["input_ids"], texts["attention_mask"])  # [C, E]
    pixels = collator(records)["pixel_values"]
    image_feats = model.image_features(model.image_embeds(pixels))  # [N, Q, E]
    best = torch.einsum("iqe,ce->icq", image_feats, text_feat).max(-1).values.argmax(-1)
    return sum(CAPTIONS[int(i)] == r["caption"] for i, r in zip(best, records)) / len(records)


@torch.no_grad()
def caption_loss(model, collator, records: list[dict]) -> float:
    model.eval()
    return float(model(**collator(records)).loss)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out, started = Path(args.output_dir), time.time()
    processor = shapes.build_processor()
    tokenizer = qformer_tokenizer()
    # 1. the frozen parts' own pretraining (the real ones come pretrained)
    stage1 = stage1_model(processor, tokenizer, args.seed)
    shapes.pretrain_vision(stage1, processor, steps=args.vision_steps)
    instruct = shapes.build_model(processor, seed=args.seed)
    shapes.pretrain_llm(instruct, processor, steps=args.llm_steps)
    # 2. stage 1
    collator = QFormerPretrainingCollator(processor.image_processor, tokenizer)
    held_out = caption_set(args.eval_size, args.seed + 50)
    before = recall_at_1(stage1, collator, held_out)
    stage1_data = DistinctCaptionBlocks(args.stage1_steps * len(CAPTIONS), args.seed + 1)
    stage1_args = trainer_args(out / "stage1_trainer", args.stage1_steps, args, 1e-3, batch=len(CAPTIONS))
    trainer = QFormerPretrainingTrainer(model=stage1, data_collator=collator, train_dataset=stage1_data,
                                        args=stage1_args)
    trainer.train()
    last = [log for log in trainer.state.log_history if "loss_itc" in log][-1]
    after = recall_at_1(stage1, collator, held_out)
    print(f"stage 1: last logged loss_itc {last['loss_itc']:.3f}, loss_itm {last['loss_itm']:.3f}, "
          f"loss_itg {last['loss_itg']:.3f}; image->text recall@1 {before:.3f} -> {after:.3f} "
          f"(chance {1 / len(CAPTIONS):.3f})")
    stage1.save_pretrained(out / "stage1")
    tokenizer.save_pretrained(out / "stage1")
    # 3. stage 2: the stage-1 Q-Former + the LLM, BLIP-2 style, trained on captions
    model, stage2_processor = stage2_model(str(out / "stage1"), instruct.language_model, tokenizer=processor.tokenizer,
                                           image_processor=processor.image_processor)
    model.generation_config.update(max_new_tokens=4, num_beams=1, do_sample=False, pad_token_id=0, eos_token_id=2)
    caption_collator = InstructBlipDataCollator(stage2_processor, decoder_only=True)
    held_out_captions = caption_records(held_out, encoder_decoder=False)
    loss_before = caption_loss(model, caption_collator, held_out_captions)
    freeze_for_instruction_tuning(model)
    InstructBlipTrainer(model=model, data_collator=caption_collator,
                        train_dataset=caption_records(caption_set(args.stage2_steps * args.batch_size, args.seed + 2),
                                                      encoder_decoder=False),
                        args=trainer_args(out / "stage2_trainer", args.stage2_steps, args, 2e-3)).train()
    loss_after = caption_loss(model, caption_collator, held_out_captions)
    print(f"stage 2: held-out caption loss {loss_before:.3f} -> {loss_after:.3f}")
    export_blip2(model, out / "blip2", stage2_processor)
    # 4. instruction tuning from the stage-2 model
    model.config.instruction_aware = True
    sets = {"held-in": [r for i, task in enumerate(shapes.TASKS) for r in shapes.make_records(task, 40, 100 + i)],
            "held-out": [r for i, task in enumerate(shapes.TASKS)
                         for r in shapes.make_records(task, 40, 200 + i, held_out=True)]}
    train = [r for i, task in enumerate(shapes.TASKS)
             for r in shapes.make_records(task, args.tuning_steps * args.batch_size // 3 + 1, 300 + i)]
    InstructBlipTrainer(model=model, data_collator=InstructBlipDataCollator(stage2_processor, decoder_only=True),
                        train_dataset=train, args=trainer_args(out / "tuning_trainer", args.tuning_steps, args,
                                                               2e-3)).train()
    scores = {name: shapes.accuracy(model, stage2_processor, records) for name, records in sets.items()}
    print(f"instruction tuning: held-in accuracy {scores['held-in']:.3f}, held-out {scores['held-out']:.3f}")
    model.save_pretrained(out / "instructblip")
    stage2_processor.save_pretrained(out / "instructblip")
    summary = {"recall_at_1": after, "recall_at_1_before": before, "chance": 1 / len(CAPTIONS),
               "caption_loss_before": loss_before, "caption_loss_after": loss_after, **scores,
               "seconds": round(time.time() - started)}
    (out / "summary.json").write_text(__import__("json").dumps(summary, indent=2))
    print(f"done in {summary['seconds']}s: {out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
