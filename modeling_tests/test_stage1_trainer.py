"""Stage-1 pretraining through `Trainer` (pretraining/collator.py, trainer.py): LAVIS's text layout, a frozen vision
encoder, per-loss logs, checkpoints transformers reads, and an exact resume."""

from __future__ import annotations

import pytest
import torch
from transformers import Blip2ForImageTextRetrieval, TrainingArguments

import stage1_cases
import tiny
from hf_instructblip.pretraining.collator import QFormerPretrainingCollator
from hf_instructblip.pretraining.trainer import QFormerPretrainingTrainer

RECORDS = [{"image": image, "caption": caption}
           for image, caption in zip(tiny.images(8, seed=4), stage1_cases.CAPTIONS + stage1_cases.CAPTIONS[:1])]


def collator() -> QFormerPretrainingCollator:
    return QFormerPretrainingCollator(tiny.image_processor(), stage1_cases.qformer_tokenizer())


def test_collator_pads_to_32_and_truncates_from_the_right():
    long = " ".join(["red circle"] * 40)
    batch = collator()([{"image": RECORDS[0]["image"], "caption": long}, RECORDS[1]])
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (2, 32)
    assert batch["pixel_values"].shape == (2, 3, tiny.IMAGE_SIZE, tiny.IMAGE_SIZE)
    tok = stage1_cases.qformer_tokenizer()
    assert batch["input_ids"][0, 1].item() == tok.convert_tokens_to_ids("red")  # the beginning is kept
    assert batch["attention_mask"][0].all() and not batch["attention_mask"][1].all()
    with pytest.raises(ValueError, match="record 0: expected a mapping with 'image' and a str 'caption'"):
        collator()([{"image": RECORDS[0]["image"], "text": "x"}])


def make_trainer(out, **overrides) -> QFormerPretrainingTrainer:
    args = TrainingArguments(str(out), per_device_train_batch_size=4, num_train_epochs=2, learning_rate=1e-3,
                             logging_steps=1, save_steps=2, report_to=[], seed=0, use_cpu=True, optim="adamw_torch",
                             **overrides)
    model = stage1_cases.model()
    model.vision_model.requires_grad_(True)  # the trainer freezes it
    return QFormerPretrainingTrainer(model=model, args=args, train_dataset=RECORDS, data_collator=collator())


def trained(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_trainer_logs_each_loss_freezes_vision_saves_blip2_and_resumes_exactly(tmp_path):
    trainer = make_trainer(tmp_path / "run")
    before = trained(trainer.model)
    trainer.train()
    after = trained(trainer.model)
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 4 and all({"loss_itc", "loss_itm", "loss_itg"} <= entry.keys() for entry in logs)
    for entry in logs:
        assert entry["loss"] == pytest.approx(entry["loss_itc"] + entry["loss_itm"] + entry["loss_itg"], abs=1e-3)
    frozen = [n for n in before if n.startswith("vision_model.") and "post_layernorm" not in n]
    assert frozen and all(torch.equal(before[n], after[n]) for n in frozen)
    assert not torch.equal(before["vision_model.post_layernorm.weight"], after["vision_model.post_layernorm.weight"])
    assert not torch.equal(before["query_tokens"], after["query_tokens"])
    checkpoint = tmp_path / "run" / "checkpoint-2"
    theirs = Blip2ForImageTextRetrieval.from_pretrained(checkpoint)
    assert theirs.query_tokens.shape == before["query_tokens"].shape
    resumed = make_trainer(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(checkpoint))
    for name, value in trained(resumed.model).items():
        torch.testing.assert_close(value, after[name], atol=1e-6, rtol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
