"""Instruction tuning end to end: freezing, InstructBlipTrainer, gradient accumulation, saving, PEFT.

Every `Trainer` run is tiny (a few steps on CPU). Reference values come from plain `model(**batch).loss`
backward passes and parameter snapshots, never from the trainer under test.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import tiny
from torch.utils.data import Sampler, SequentialSampler
from transformers import TrainingArguments

from hf_instructblip import InstructBlipConfig, InstructBlipForConditionalGeneration
from hf_instructblip.training.collator import InstructBlipDataCollator
from hf_instructblip.training.freezing import (
    TRAINABLE_WEIGHTS_NAME,
    freeze_for_instruction_tuning,
    load_trainable_weights,
    parameter_table,
    save_trainable_weights,
)
from hf_instructblip.training.trainer import InstructBlipTrainer

INSTRUCTIONS = [
    "what is in the picture ?", "describe the image briefly .", "how many shapes are there ?",
    "what colour is the circle ?", "question : what shape is shown ?", "a short caption of the photo :",
    "is this a cat or a dog ?", "what colour is the square ?",
]
# unequal answer lengths, so micro-batches hold different numbers of label tokens
ANSWERS = ["a red circle on a white background .", "a blue square .", "two .", "red .", "a square .",
           "two yellow stars in the sky .", "a dog .", "blue ."]
TRAINED_PREFIXES = ("qformer.", "query_tokens", "language_projection.")




def make_processor(kind: str, num_query_tokens: int = tiny.NUM_QUERY_TOKENS):
    return tiny.processor(kind, num_query_tokens)


def make_model(kind: str, processor, seed: int = 0, text_overrides: dict | None = None, freeze: bool = True,
               only_llm_random: bool = False) -> InstructBlipForConditionalGeneration:
    """Tiny model with N(0, 0.2) weights (so gradients carry signal; `only_llm_random`: just the LLM's),
    frozen for instruction tuning."""
    kwargs = tiny.config_kwargs(kind, image_token_index=processor.image_token_id,
                                num_query_tokens=processor.num_query_tokens)
    if text_overrides:
        kwargs["text_config"] = tiny.text_config(kind, **text_overrides).to_dict()
    torch.manual_seed(seed)
    model = InstructBlipForConditionalGeneration(InstructBlipConfig(**kwargs))
    tiny.randomize_(model.language_model if only_llm_random else model, seed=seed)
    if freeze:
        freeze_for_instruction_tuning(model)
    return model


def make_records(n: int = 8, names: list[str] | None = None) -> list[dict]:
    images = tiny.images(n)
    records = [{"image": images[i], "instruction": INSTRUCTIONS[i % 8], "answer": ANSWERS[i % 8]} for i in range(n)]
    if names:
        records = [{**record, "dataset": names[i % len(names)]} for i, record in enumerate(records)]
    return records


def collator_for(kind: str, processor) -> InstructBlipDataCollator:
    return InstructBlipDataCollator(processor, decoder_only=kind != "t5")


def training_args(tmp_path: Path, **overrides) -> TrainingArguments:
    args = dict(output_dir=str(tmp_path), report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no",
                logging_steps=1, lr_scheduler_type="constant", dataloader_num_workers=0, seed=0)
    return TrainingArguments(**{**args, **overrides})


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in model.named_parameters()}


def is_trained(name: str) -> bool:
    return name.startswith(TRAINED_PREFIXES)


# --- freezing ---------------------------------------------------------------------------------------------
def test_freeze_sets_flags_and_counts_per_part():
    processor = make_processor("llama")
    model = make_model("llama", processor, freeze=False)
    table = freeze_for_instruction_tuning(model)
    for name, param in model.named_parameters():
        assert param.requires_grad == is_trained(name), name
    trained = sum(p.numel() for n, p in model.named_parameters() if is_trained(n))
    assert table.trainable == trained and table.frozen == model.num_parameters() - trained
    rows = {part: (t, f) for part, t, f in table.rows}
    assert rows["qformer"] == (model.qformer.num_parameters(), 0)
    assert rows["language_model"] == (0, model.language_model.num_parameters())
    assert "language_projection" in str(table) and "total" in str(table)

    table = freeze_for_instruction_tuning(model, train_post_layernorm=True)
    post = sum(p.numel() for p in model.vision_model.post_layernorm.parameters())
    assert table.trainable == trained + post
    assert all(p.requires_grad for p in model.vision_model.post_layernorm.parameters())
    assert parameter_table(model).rows == table.rows


def test_freeze_rejects_other_modules():
    with pytest.raises(TypeError, match="InstructBlipForConditionalGeneration.*found Linear"):
        freeze_for_instruction_tuning(torch.nn.Linear(2, 2))


def test_frozen_parts_stay_in_eval_so_their_dropout_is_off():
    processor = make_processor("llama")
    overrides = {"attention_dropout": 0.5}  # dropout that would be active in a training-mode LLM
    batch = collator_for("llama", processor)(make_records(2))

    unfrozen = make_model("llama", processor, text_overrides=overrides, freeze=False).train()
    assert not torch.equal(unfrozen(**batch).logits, unfrozen(**batch).logits)  # control: dropout does act

    model = make_model("llama", processor, text_overrides=overrides)
    model.train()
    assert model.training and model.qformer.training
    for part in (model.vision_model, model.language_model):
        assert not any(module.training for module in part.modules())
    torch.testing.assert_close(model(**batch).logits, model(**batch).logits, rtol=0, atol=0)
    assert not copy.deepcopy(model).train().language_model.training  # the pin survives copies


# --- Trainer --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_trainer_updates_trainable_and_leaves_frozen_bit_identical(kind, tmp_path):
    processor = make_processor(kind)
    model = make_model(kind, processor)
    before = snapshot(model)
    trainer = InstructBlipTrainer(model=model, args=training_args(tmp_path, max_steps=3, learning_rate=1e-2,
                                                                  per_device_train_batch_size=4),
                                  train_dataset=make_records(8), data_collator=collator_for(kind, processor))
    assert trainer.args.remove_unused_columns is False  # the collator needs raw fields
    trainer.train()

    last = model.config.qformer_config.num_hidden_layers - 1
    # The last layer's text-only FFN feeds only text outputs, which the model discards: no gradient reaches it.
    dead = (f"qformer.encoder.layer.{last}.intermediate.", f"qformer.encoder.layer.{last}.output.")
    for name, param in model.named_parameters():
        unchanged = torch.equal(param, before[name])
        if is_trained(name) and not name.startswith(dead):
            assert not unchanged, f"trainable {name} did not change"
        else:
            assert unchanged, f"{name} changed"
    for part in (model.vision_model, model.language_model):
        assert not any(module.training for module in part.modules())


def _one_update(kind, processor, model, tmp_path, batch_size, accumulation, lr):
    trainer = InstructBlipTrainer(
        model=model, train_dataset=make_records(4), data_collator=collator_for(kind, processor),
        train_sampler=SequentialSampler(range(4)),
        args=training_args(tmp_path, max_steps=1, optim="sgd", learning_rate=lr, max_grad_norm=0.0,
                           per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation),
    )
    trainer.train()
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_gradient_accumulation_is_exact(kind, tmp_path):
    """batch 4 x GA 1 == batch 2 x GA 2 == one SGD step on the mean token loss of all 4 records."""
    processor, lr = make_processor(kind), 0.5
    collator = collator_for(kind, processor)
    tokens = [int((collator(make_records(4)[i:i + 2])["labels"] != -100).sum()) for i in (0, 2)]
    assert tokens[0] != tokens[1]  # unequal micro-batches: a per-micro-batch mean would be wrong

    initial = make_model(kind, processor)
    reference = copy.deepcopy(initial)
    reference(**collator(make_records(4))).loss.backward()
    expected = {n: p.detach() - lr * p.grad for n, p in reference.named_parameters() if p.requires_grad}

    full = _one_update(kind, processor, copy.deepcopy(initial), tmp_path / "a", 4, 1, lr)
    accumulated = _one_update(kind, processor, copy.deepcopy(initial), tmp_path / "b", 2, 2, lr)
    start = dict(initial.named_parameters())
    assert max((expected[n] - start[n]).abs().max().item() for n in expected) > 1e-3  # a real update
    for name in expected:
        torch.testing.assert_close(full[name], expected[name], rtol=0, atol=1e-6, msg=name)
        torch.testing.assert_close(accumulated[name], expected[name], rtol=0, atol=1e-6, msg=name)


def test_overfits_eight_examples_training_only_the_qformer(tmp_path):
    processor = make_processor("llama", num_query_tokens=16)
    model = make_model("llama", processor, freeze=False, only_llm_random=True)
    with torch.no_grad():  # a frozen LLM whose logits can be steered far from uniform
        model.get_output_embeddings().weight.mul_(6.0)
    freeze_for_instruction_tuning(model)
    records = [{**r, "answer": a} for r, a in zip(make_records(8), ["a red circle .", "a blue square .", "two .",
                                                                    "red .", "a square .", "two stars .",
                                                                    "a dog .", "blue ."])]
    trainer = InstructBlipTrainer(model=model, train_dataset=records, data_collator=collator_for("llama", processor),
                                  args=training_args(tmp_path, max_steps=150, learning_rate=1e-2, logging_steps=10,
                                                     per_device_train_batch_size=8))
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[0] > 3.0 and losses[-1] < 0.05, losses


def test_per_dataset_counts_and_loss_are_logged(tmp_path):
    processor = make_processor("llama")
    collator = collator_for("llama", processor)
    model = make_model("llama", processor)
    records = make_records(8, names=["vqa", "caption", "vqa", "vqa"])  # vqa: 0 2 3 4 6 7, caption: 1 5
    initial = copy.deepcopy(model)
    trainer = InstructBlipTrainer(model=model, train_dataset=records, data_collator=collator,
                                  train_sampler=SequentialSampler(range(8)),
                                  args=training_args(tmp_path, max_steps=2, learning_rate=1e-3,
                                                     per_device_train_batch_size=4))
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert (logs[0]["dataset/vqa/samples"], logs[0]["dataset/caption/samples"]) == (3, 1)
    assert (logs[1]["dataset/vqa/samples"], logs[1]["dataset/caption/samples"]) == (6, 2)  # cumulative
    with torch.no_grad():  # step-1 loss per dataset = the initial model's token-mean loss on those records
        for name, rows in (("vqa", [0, 2, 3]), ("caption", [1])):
            batch = collator([records[i] for i in rows])
            batch.pop("dataset")
            expected = initial(**batch).loss.item()
            assert logs[0][f"dataset/{name}/loss"] == pytest.approx(expected, rel=1e-5)


class RecordingSampler(Sampler):
    """Fixed order; records `set_epoch` calls (the hook a balanced mixture sampler provides)."""

    def __init__(self, order: list[int]):
        self.order, self.epochs = order, []

    def set_epoch(self, epoch: int) -> None:
        self.epochs.append(epoch)

    def __iter__(self):
        return iter(self.order)

    def __len__(self) -> int:
        return len(self.order)


class RecordingDataset(torch.utils.data.Dataset):
    def __init__(self, records: list[dict]):
        self.records, self.seen = records, []

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        self.seen.append(index)
        return self.records[index]


def test_train_sampler_drives_the_train_loader(tmp_path):
    processor = make_processor("llama")
    sampler, dataset = RecordingSampler([3, 1, 2, 0]), RecordingDataset(make_records(4))
    trainer = InstructBlipTrainer(model=make_model("llama", processor), train_dataset=dataset,
                                  data_collator=collator_for("llama", processor), train_sampler=sampler,
                                  args=training_args(tmp_path, num_train_epochs=2, learning_rate=1e-3,
                                                     per_device_train_batch_size=2))
    trainer.train()
    assert dataset.seen == [3, 1, 2, 0] * 2
    assert sorted(set(sampler.epochs)) == [0, 1]


def test_trainer_argument_errors(tmp_path):
    processor = make_processor("llama")
    model = make_model("llama", processor)
    with pytest.raises(TypeError, match="train_sampler.*Sampler.*found list"):
        InstructBlipTrainer(model=model, args=training_args(tmp_path), train_sampler=[0, 1])
    with pytest.raises(ValueError, match="decoder_only=False.*decoder-only"):
        InstructBlipTrainer(model=model, args=training_args(tmp_path),
                            data_collator=InstructBlipDataCollator(make_processor("t5"), decoder_only=False))


# --- checkpoints ----------------------------------------------------------------------------------------------
def _train_and_save(tmp_path, model, processor, **overrides):
    trainer = InstructBlipTrainer(model=model, train_dataset=make_records(4),
                                  data_collator=collator_for("llama", processor),
                                  args=training_args(tmp_path, max_steps=2, learning_rate=1e-2, save_strategy="steps",
                                                     save_steps=2, per_device_train_batch_size=2),
                                  **overrides)
    trainer.train()
    return trainer, tmp_path / "checkpoint-2"


def test_checkpoint_loads_with_from_pretrained(tmp_path):
    processor = make_processor("llama")
    model = make_model("llama", processor)
    _, checkpoint = _train_and_save(tmp_path, model, processor)
    loaded = InstructBlipForConditionalGeneration.from_pretrained(checkpoint)
    trained = model.state_dict()
    assert loaded.state_dict().keys() == trained.keys()
    for name, tensor in loaded.state_dict().items():
        torch.testing.assert_close(tensor, trained[name], rtol=0, atol=0, msg=name)


def test_trainable_only_checkpoint_loads_on_base_and_resumes(tmp_path):
    processor = make_processor("llama")
    model = make_model("llama", processor)
    base = copy.deepcopy(model)
    trainer, checkpoint = _train_and_save(tmp_path, model, processor, save_trainable_only=True)
    assert (checkpoint / TRAINABLE_WEIGHTS_NAME).is_file()
    assert not (checkpoint / "model.safetensors").exists()

    loaded = load_trainable_weights(base, checkpoint)
    assert loaded == sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert sum(dict(model.named_parameters())[n].numel() for n in loaded) == parameter_table(model).trainable
    for name, tensor in base.state_dict().items():
        torch.testing.assert_close(tensor, model.state_dict()[name], rtol=0, atol=0, msg=name)

    resumed = make_model("llama", processor)  # resume restores the trained weights from the trainable-only file
    InstructBlipTrainer(model=resumed, train_dataset=make_records(4), data_collator=collator_for("llama", processor),
                        save_trainable_only=True, args=trainer.args).train(resume_from_checkpoint=str(checkpoint))
    for name, tensor in resumed.state_dict().items():
        torch.testing.assert_close(tensor, model.state_dict()[name], rtol=0, atol=0, msg=name)


def test_load_trainable_weights_errors(tmp_path):
    processor = make_processor("llama")
    model = make_model("llama", processor)
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        load_trainable_weights(model, tmp_path)
    save_trainable_weights(model, tmp_path)
    other = make_model("llama", make_processor("llama", num_query_tokens=6))
    with pytest.raises(ValueError, match="shapes differ.*query_tokens"):
        load_trainable_weights(other, tmp_path)


def test_peft_lora_on_llm_with_trainable_qformer_saves_and_reloads(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    processor = make_processor("llama")
    model = make_model("llama", processor, freeze=False)
    base = copy.deepcopy(model)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                  target_modules=["q_proj", "v_proj"]))
    freeze_for_instruction_tuning(peft_model)  # after get_peft_model, which freezes all but the adapters
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in trainable) and any(".qformer." in n for n in trainable)
    assert not any(".vision_model." in n or ("language_model" in n and "lora_" not in n) for n in trainable)
    before = snapshot(peft_model)

    trainer = InstructBlipTrainer(model=peft_model, train_dataset=make_records(4),
                                  data_collator=collator_for("llama", processor),
                                  args=training_args(tmp_path, max_steps=3, learning_rate=1e-2,
                                                     per_device_train_batch_size=2))
    trainer.train()
    after = snapshot(peft_model)
    assert any(not torch.equal(after[n], before[n]) for n in after if "lora_B" in n)
    assert not torch.equal(after["base_model.model.language_projection.weight"],
                           before["base_model.model.language_projection.weight"])
    assert all(torch.equal(after[n], before[n]) for n in after if n not in trainable)

    trainer.save_model(str(tmp_path / "final"))
    assert (tmp_path / "final" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "final" / TRAINABLE_WEIGHTS_NAME).is_file()
    load_trainable_weights(base, tmp_path / "final")
    reloaded = PeftModel.from_pretrained(base, tmp_path / "final").eval()
    batch = collator_for("llama", processor)(make_records(2))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, peft_model.eval()(**batch).logits, rtol=0, atol=0)


def test_evaluate_accepts_named_records(tmp_path):
    processor = make_processor("llama")
    collator = collator_for("llama", processor)
    model = make_model("llama", processor)
    records = make_records(4, names=["vqa", "caption"])
    trainer = InstructBlipTrainer(model=model, data_collator=collator,
                                  args=training_args(tmp_path, per_device_eval_batch_size=4,
                                                     prediction_loss_only=True))
    metrics = trainer.evaluate(eval_dataset=records)
    batch = collator(records)
    batch.pop("dataset")
    with torch.no_grad():
        assert metrics["eval_loss"] == pytest.approx(model.eval()(**batch).loss.item(), rel=1e-5)


def test_trainer_rejects_collator_with_another_image_token(tmp_path):
    processor = make_processor("llama")
    model = make_model("llama", processor)
    other = tiny.processor("llama", image_token=processor.tokenizer.convert_ids_to_tokens(299))
    with pytest.raises(ValueError, match="image token id 299.*image_token_index is 300"):
        InstructBlipTrainer(model=model, args=training_args(tmp_path),
                            data_collator=InstructBlipDataCollator(other, decoder_only=True))


@pytest.mark.parametrize("peft", [False, True], ids=["trainable-only", "peft"])
def test_load_best_model_at_end_restores_the_best_trainable_weights(tmp_path, peft):
    """`Trainer` knows full and adapter weights only; the best checkpoint's Q-Former must come back too."""
    from transformers import TrainerCallback

    processor = make_processor("llama")
    model = make_model("llama", processor, freeze=not peft)
    if peft:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                 target_modules=["q_proj", "v_proj"]))
        freeze_for_instruction_tuning(model)
    snapshots = {}

    class Snapshot(TrainerCallback):
        def on_save(self, args, state, control, model=None, **kwargs):
            snapshots[state.global_step] = {n: p.detach().clone() for n, p in model.named_parameters()
                                            if p.requires_grad}

    # Evaluation loss falls as training goes on; `greater_is_better=True` makes step 1 the best, not the last.
    args = training_args(tmp_path, max_steps=3, learning_rate=5e-2, save_strategy="steps", save_steps=1,
                         eval_strategy="steps", eval_steps=1, load_best_model_at_end=True,
                         metric_for_best_model="eval_loss", greater_is_better=True, per_device_train_batch_size=2)
    trainer = InstructBlipTrainer(model=model, args=args, train_dataset=make_records(4),
                                  eval_dataset=make_records(4), data_collator=collator_for("llama", processor),
                                  save_trainable_only=not peft, callbacks=[Snapshot()])
    trainer.train()
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-1")
    final = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    assert any(not torch.equal(final[n], snapshots[3][n]) for n in final)  # not simply the last step
    for name, value in final.items():
        assert torch.equal(value, snapshots[1][name]), name


def test_trainer_leaves_the_callers_arguments_alone(tmp_path):
    processor = make_processor("llama")
    args = training_args(tmp_path, max_steps=1)
    args.remove_unused_columns = True
    trainer = InstructBlipTrainer(model=make_model("llama", processor), args=args, train_dataset=make_records(2),
                                  data_collator=collator_for("llama", processor))
    assert trainer.args.remove_unused_columns is False and args.remove_unused_columns is True
