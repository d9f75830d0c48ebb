"""Q-Former-only instruction tuning through TRL's `SFTTrainer`: `InstructBlipSFTTrainer` for both LLM families and
TRL's dataset formats, and plain `SFTTrainer` with our collator.

The oracles are independent of the trainers: `InstructBlipDataCollator` on the same records for the batch, the
model's own `forward(labels=...)` loss on a copy of the untrained model for the first step's loss, and parameter
snapshots for what trained.
"""

from __future__ import annotations

import copy

import pytest
import tiny
import torch
from transformers import TrainingArguments

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling  # noqa: E402

from hf_instructblip import (  # noqa: E402
    InstructBlipConfig,
    InstructBlipDataCollator,
    InstructBlipForConditionalGeneration,
    freeze_for_instruction_tuning,
)
from hf_instructblip.training.sft import InstructBlipSFTTrainer, trl_record  # noqa: E402

IMAGE_TOKEN = 300  # the tiny processor's "<image>"
INSTRUCTIONS = ["what colour is the circle ?", "how many shapes are there ?", "describe the image briefly .",
                "what shape is shown ?"]
ANSWERS = ["the circle is red .", "two .", "a blue square and a green triangle .", "a square ."]  # unequal lengths
FORMATS = ("ours", "prompt_completion", "messages", "conversational_prompt_completion")
FLAGS = {"fused_lm_head", "fused_head_loss", "use_cache", "num_items_in_batch"}  # set by the trainers, not data


def our_records() -> list[dict]:
    return [{"image": image, "instruction": instruction, "answer": answer}
            for image, instruction, answer in zip(tiny.images(4), INSTRUCTIONS, ANSWERS)]


def user(text: str) -> dict:
    return {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def records(fmt: str) -> list[dict]:
    """The same four examples in one of TRL's dataset formats (or ours)."""
    rows = our_records()
    if fmt == "ours":
        return rows
    if fmt == "prompt_completion":
        return [{"images": [r["image"]], "prompt": r["instruction"], "completion": r["answer"]} for r in rows]
    if fmt == "messages":
        return [{"images": [r["image"]], "messages": [user(r["instruction"]), assistant(r["answer"])]} for r in rows]
    return [{"images": [r["image"]], "prompt": [user(r["instruction"])], "completion": [assistant(r["answer"])]}
            for r in rows]


def frozen_model(kind: str) -> InstructBlipForConditionalGeneration:
    model = InstructBlipForConditionalGeneration(InstructBlipConfig(**tiny.config_kwargs(kind, IMAGE_TOKEN)))
    tiny.randomize_(model)
    freeze_for_instruction_tuning(model)
    return model


def sft_config(tmp_path, **overrides) -> trl.SFTConfig:
    settings = dict(max_steps=2, per_device_train_batch_size=2, learning_rate=1e-3, report_to=[], use_cpu=True,
                    bf16=False, save_strategy="no", logging_steps=1, train_sampling_strategy="sequential",
                    gradient_checkpointing=False)
    return trl.SFTConfig(str(tmp_path), **{**settings, **overrides})


def train_and_check(trainer, model: torch.nn.Module, before: torch.nn.Module, kind: str) -> None:
    """Train 2 steps; the first batch the model got is our collator's, token for token, the first step's loss is the
    model's own on it (`before`: a copy of the model taken before the trainer patched it), the Q-Former trained and
    the vision encoder and LLM stayed bit-identical."""
    seen: list[dict] = []
    handle = model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(dict(kwargs)), with_kwargs=True)
    trainer.train()
    handle.remove()
    collator = InstructBlipDataCollator(tiny.processor(kind), decoder_only=kind != "t5")
    expected = collator(our_records()[:2])  # sequential sampling: the first two examples
    assert set(seen[0]) - FLAGS == set(expected)
    for key, value in expected.items():
        assert torch.equal(seen[0][key], value), key
    reference = before.train()(**expected).loss  # dropout is 0: training mode changes nothing but the path
    first_loss = trainer.state.log_history[0]["loss"]
    assert abs(first_loss - reference.item()) <= 1e-5, (first_loss, reference.item())
    trained = dict(model.named_parameters())
    for name, param in before.named_parameters():
        if name.startswith(("vision_model.", "language_model.")):
            assert torch.equal(trained[name], param), name
    assert not torch.equal(trained["query_tokens"], before.query_tokens)
    assert any(not torch.equal(trained[n], p) for n, p in before.named_parameters() if n.startswith("qformer."))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_instructblip_sft_trainer_trains_lavis_layout(kind, fmt, tmp_path):
    model = frozen_model(kind)
    before = copy.deepcopy(model)
    processor = tiny.processor(kind)
    # our records with our collator passed in (the processor is read from it); TRL's formats with the defaults
    batching = ({"data_collator": InstructBlipDataCollator(processor, decoder_only=kind != "t5")} if fmt == "ours"
                else {"processing_class": processor})
    trainer = InstructBlipSFTTrainer(model=model, args=sft_config(tmp_path), train_dataset=records(fmt), **batching)
    train_and_check(trainer, model, before, kind)


def test_plain_sft_trainer_with_our_collator_trains_llama(tmp_path):
    model = frozen_model("llama")
    before = copy.deepcopy(model)
    processor = tiny.processor("llama")
    args = sft_config(tmp_path, remove_unused_columns=False, dataset_kwargs={"skip_prepare_dataset": True})
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(our_records()),
                             data_collator=InstructBlipDataCollator(processor, decoder_only=True),
                             processing_class=processor)
    train_and_check(trainer, model, before, "llama")


def test_plain_sft_trainer_refuses_t5(tmp_path):
    """TRL's fused head would shift T5's labels: the model refuses the call it makes (no decoder inputs)."""
    processor = tiny.processor("t5")
    args = sft_config(tmp_path, remove_unused_columns=False, dataset_kwargs={"skip_prepare_dataset": True})
    trainer = trl.SFTTrainer(model=frozen_model("t5"), args=args,
                             train_dataset=datasets.Dataset.from_list(our_records()),
                             data_collator=InstructBlipDataCollator(processor, decoder_only=False),
                             processing_class=processor)
    with pytest.raises(ValueError, match="encoder-decoder LLM with TRL, use hf_instructblip.InstructBlipSFTTrainer"):
        trainer.train()


@pytest.mark.parametrize("fmt", ["prompt_completion", "messages", "conversational_prompt_completion"])
@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_plain_sft_trainer_with_trls_collator_is_refused(kind, fmt, tmp_path):
    """TRL's own vision collator tokenizes without special tokens: Llama labels without eos, T5's answer in the
    encoder input, every token of `messages` labelled. The processor refuses the call and names our trainer."""
    model = frozen_model(kind)
    before = copy.deepcopy(model)
    trainer = trl.SFTTrainer(model=model, args=sft_config(tmp_path),
                             train_dataset=datasets.Dataset.from_list(records(fmt)),
                             processing_class=tiny.processor(kind))
    assert isinstance(trainer.data_collator, DataCollatorForVisionLanguageModeling)
    with pytest.raises(ValueError, match=r"add_special_tokens=False.*train with hf_instructblip.InstructBlipSFTTrainer"):
        trainer.train()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before.parameters()))  # nothing trained


@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_foreign_collators_are_refused(kind, tmp_path):
    """LAVIS's layout has one writer: TRL's vision collator, or any other, is refused by type before training."""
    processor = tiny.processor(kind)
    ours = InstructBlipDataCollator(processor, decoder_only=kind != "t5")
    for collator in (DataCollatorForVisionLanguageModeling(processor, completion_only_loss=True),
                     lambda examples: ours([trl_record(example, processor) for example in examples])):
        with pytest.raises(TypeError, match="`data_collator`: expected None or an InstructBlipDataCollator"):
            InstructBlipSFTTrainer(model=frozen_model(kind), args=sft_config(tmp_path),
                                   train_dataset=records("prompt_completion"), data_collator=collator,
                                   processing_class=processor)


def test_training_arguments_become_an_sft_config_with_what_our_batches_need(tmp_path):
    args = TrainingArguments(str(tmp_path), use_cpu=True, report_to=[])
    trainer = InstructBlipSFTTrainer(model=frozen_model("t5"), args=args, train_dataset=records("ours"),
                                     processing_class=tiny.processor("t5"))
    assert isinstance(trainer.args, trl.SFTConfig) and trainer.args.output_dir == str(tmp_path)
    assert not trainer.args.remove_unused_columns and trainer.args.dataset_kwargs == {"skip_prepare_dataset": True}
    assert args.remove_unused_columns  # the caller's arguments are left as they were


def test_refused_arguments_and_examples(tmp_path):
    processor = tiny.processor("t5")
    make = lambda model=None, **kwargs: InstructBlipSFTTrainer(  # noqa: E731
        model=model or frozen_model("t5"), train_dataset=records("ours"), processing_class=processor, **kwargs)
    with pytest.raises(ValueError, match=r"`args.max_length`: expected 1024, found 64"):
        make(args=sft_config(tmp_path, max_length=64))
    with pytest.raises(ValueError, match=r"skip_prepare_dataset'\]`: expected True, found False"):
        make(args=sft_config(tmp_path, dataset_kwargs={"skip_prepare_dataset": False}))
    with pytest.raises(ValueError, match=r"`args.loss_type`: expected 'nll' for an encoder-decoder LLM"):
        make(args=sft_config(tmp_path, loss_type="dft"))
    with pytest.raises(ValueError, match=r"`data_collator` was built with decoder_only=True, but the model's LLM is encoder-decoder"):
        make(args=sft_config(tmp_path), data_collator=InstructBlipDataCollator(processor, decoder_only=True))
    with pytest.raises(ValueError, match=r"`peft_config`: expected None; wrap the model yourself"):
        make(args=sft_config(tmp_path), peft_config=object())
    with pytest.raises(TypeError, match="`model`: expected an InstructBlipForConditionalGeneration instance"):
        InstructBlipSFTTrainer(model="Salesforce/instructblip-flan-t5-xl", train_dataset=records("ours"))
    image = tiny.images(1)[0]
    two_turns = [user("a ?"), assistant("b ."), user("c ?"), assistant("d .")]
    with pytest.raises(ValueError, match=r"expected the roles \['user', 'assistant'\].*found \['user', 'assistant', "):
        trl_record({"images": [image], "messages": two_turns}, processor)
    with pytest.raises(ValueError, match="'images' must be a list of exactly one image.*found 2"):
        trl_record({"images": [image, image], "prompt": "a ?", "completion": "b ."}, processor)
    with pytest.raises(ValueError, match="expected 'instruction'/'answer'.*found the keys \\['images', 'text'\\]"):
        trl_record({"images": [image], "text": "a ? b ."}, processor)
