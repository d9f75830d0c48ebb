"""Evaluation with generation during training: prompt-only batches, `InstructBlipTrainer` with
`predict_with_generate=True`, and `generation_metrics`.

Oracles: literal token ids read off the tiny tokenizers (as in test_collator.py), the processor's batched prompts fed to
`model.generate` directly, and the package's metric functions applied to those generations.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import tiny
from transformers import EvalPrediction, GenerationConfig, Seq2SeqTrainingArguments, TrainingArguments

from hf_instructblip import (
    InstructBlipConfig,
    InstructBlipDataCollator,
    InstructBlipForConditionalGeneration,
    InstructBlipTrainer,
    cider_d,
    exact_match_accuracy,
    freeze_for_instruction_tuning,
    generation_metrics,
    vqa_accuracy,
)
from hf_instructblip.evaluate.metrics import caption_tokens
from hf_instructblip.evaluate.runner import evaluate, read_predictions
from hf_instructblip.evaluate.tasks import Example, compute_metric, task_spec
from hf_instructblip.templates import eval_prompt

I = 300  # "<image>" once the processor adds it to the tiny LLM tokenizer
X = -100
KINDS = ["llama", "t5"]
NEW_TOKENS = 5

# LLM ids: "what colour is the circle ?" = [287, 269, 82, 79, 298, 85, 271, 267, 289, 270]; "is it red ?" = [293, 264,
# 87, 224, 263, 71, 270]; "yes" = [92, 272]; "the circle is red ." = [87, 75, 72, 289, 271, 224, 263, 71, 266].
LAYOUT_RECORDS = [("what colour is the circle ?", "the circle is red ."), ("is it red ?", "yes"),
                  ("yes", "is it red ?")]
ANSWER_LABELS = [
    [87, 75, 72, 289, 271, 224, 263, 71, 266, 2],
    [92, 272, 2] + [X] * 7,
    [293, 264, 87, 224, 263, 71, 270, 2, X, X],
]
TRAIN = [("what is in the picture ?", "a red circle ."), ("describe the image briefly .", "a blue square ."),
         ("how many shapes are there ?", "two ."), ("what colour is the circle ?", "red .")]
EVAL = [("is this a cat or a dog ?", "a dog ."), ("what shape is shown ?", "a square ."),
        ("a short caption of the photo :", "two yellow stars in the sky ."), ("what colour is the square ?", "blue .")]


def layout_records() -> list[dict]:
    images = tiny.images(3)
    return [{"image": image, "instruction": q, "answer": a} for image, (q, a) in zip(images, LAYOUT_RECORDS)]


def make_records(pairs: list[tuple[str, str]], seed: int) -> list[dict]:
    images = tiny.images(len(pairs), seed=seed)
    return [{"image": image, "instruction": q, "answer": a} for image, (q, a) in zip(images, pairs)]


def make_model(kind: str, processor) -> InstructBlipForConditionalGeneration:
    kwargs = tiny.config_kwargs(kind, image_token_index=processor.image_token_id,
                                num_query_tokens=processor.num_query_tokens)
    torch.manual_seed(0)
    model = InstructBlipForConditionalGeneration(InstructBlipConfig(**kwargs))
    tiny.randomize_(model, seed=0)
    freeze_for_instruction_tuning(model)
    return model


def generation_args(tmp_path: Path, **overrides) -> Seq2SeqTrainingArguments:
    args = dict(output_dir=str(tmp_path), report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no",
                logging_steps=1, lr_scheduler_type="constant", learning_rate=1e-3, dataloader_num_workers=0, seed=0,
                per_device_train_batch_size=4, per_device_eval_batch_size=2, predict_with_generate=True,
                generation_config=GenerationConfig(max_new_tokens=NEW_TOKENS))
    return Seq2SeqTrainingArguments(**{**args, **overrides})


# --- the prompt-only layout --------------------------------------------------------------------------------------
def test_decoder_only_prompt_layout_token_by_token():
    collator = InstructBlipDataCollator(tiny.processor("llama"), decoder_only=True, prompt_only=True)
    batch = collator(layout_records())
    # [image x 4][pad][bos][prompt]: the text left padded behind the placeholders; no answer id anywhere
    assert batch["input_ids"].tolist() == [
        [I, I, I, I, 1, 287, 269, 82, 79, 298, 85, 271, 267, 289, 270],
        [I, I, I, I, 0, 0, 0, 1, 293, 264, 87, 224, 263, 71, 270],
        [I, I, I, I, 0, 0, 0, 0, 0, 0, 0, 0, 1, 92, 272],
    ]
    assert batch["attention_mask"].tolist() == [[1] * 15, [1] * 4 + [0] * 3 + [1] * 8, [1] * 4 + [0] * 8 + [1] * 3]
    assert batch["labels"].tolist() == ANSWER_LABELS  # [answer][eos], right padded with -100


def test_encoder_decoder_prompt_layout_token_by_token():
    processor = tiny.processor("t5")
    batch = InstructBlipDataCollator(processor, decoder_only=False, prompt_only=True)(layout_records())
    # encoder [image x 4][prompt][eos][pad]: the T5 training layout, which is also what generation reads
    assert batch["input_ids"].tolist() == [
        [I, I, I, I, 287, 269, 82, 79, 298, 85, 271, 267, 289, 270, 2],
        [I, I, I, I, 293, 264, 87, 224, 263, 71, 270, 2, 0, 0, 0],
        [I, I, I, I, 92, 272, 2] + [0] * 8,
    ]
    assert batch["attention_mask"].tolist() == [[1] * 15, [1] * 12 + [0] * 3, [1] * 7 + [0] * 8]
    assert batch["labels"].tolist() == ANSWER_LABELS
    training = InstructBlipDataCollator(processor, decoder_only=False)(layout_records())
    assert all(torch.equal(batch[key], training[key]) for key in training)


@pytest.mark.parametrize("kind", KINDS)
def test_prompt_only_batch_is_the_processors_generation_batch(kind):
    """Untruncated, a prompt-only batch equals what the processor gives `generate` (T5: right padded)."""
    processor = tiny.processor(kind)
    records = layout_records()
    batch = InstructBlipDataCollator(processor, decoder_only=kind == "llama", prompt_only=True)(records)
    oracle = processor(images=[r["image"] for r in records], text=[r["instruction"] for r in records],
                       padding_side="left" if kind == "llama" else "right", return_tensors="pt")
    assert set(batch) == set(oracle) | {"labels"} | ({"loss_inputs"} if kind == "llama" else set())
    for key in oracle:
        assert torch.equal(batch[key], oracle[key]), key


@pytest.mark.parametrize("kind", KINDS)
def test_loss_inputs_of_a_prompt_only_batch_are_the_training_batch(kind):
    """The evaluation loss reads the prompt-only batch with its `loss_inputs` (decoder-only) laid over it: exactly the
    training collator's batch; a T5 batch is the training layout already and carries none."""
    processor = tiny.processor(kind)
    training = InstructBlipDataCollator(processor, decoder_only=kind == "llama")
    prompt_only = InstructBlipDataCollator(processor, decoder_only=kind == "llama", prompt_only=True)
    expected = training(layout_records())
    batch = prompt_only(layout_records())
    assert ("loss_inputs" in batch) == (kind == "llama")
    rebuilt = {**batch, **batch.pop("loss_inputs", {})}
    rebuilt = {key: value for key, value in rebuilt.items() if key != "loss_inputs"}
    assert set(rebuilt) == set(expected)
    assert all(torch.equal(rebuilt[key], expected[key]) for key in expected)
    if kind == "llama":  # [image x 4][bos][prompt][answer eos][pad], labels on `answer eos`
        prompt_and_answer = [1, 293, 264, 87, 224, 263, 71, 270, 92, 272, 2]
        assert expected["input_ids"][1].tolist() == [I] * 4 + prompt_and_answer + [0] * 10
        assert expected["labels"][1].tolist() == [X] * 12 + [92, 272, 2] + [X] * 10


def test_prompt_only_records_without_answers_have_no_labels():
    collator = InstructBlipDataCollator(tiny.processor("llama"), decoder_only=True, prompt_only=True)
    unlabelled = [{k: v for k, v in record.items() if k != "answer"} for record in layout_records()]
    batch = collator(unlabelled)
    assert "labels" not in batch and "loss_inputs" not in batch and batch["input_ids"].shape == (3, 15)
    with pytest.raises(ValueError, match=r"records \[1, 2\].*'answer'"):
        collator(layout_records()[:1] + unlabelled[1:])
    with pytest.raises(ValueError, match="field 'answer' is missing"):  # training batches still need answers
        InstructBlipDataCollator(tiny.processor("llama"), decoder_only=True)(unlabelled)


def test_prompt_only_bad_arguments():
    processor = tiny.processor("llama")
    with pytest.raises(ValueError, match="`train_on_prompt=True` and `prompt_only=True`"):
        InstructBlipDataCollator(processor, decoder_only=True, prompt_only=True, train_on_prompt=True)
    with pytest.raises(TypeError, match="`prompt_only` must be a bool, found str"):
        InstructBlipDataCollator(processor, decoder_only=True, prompt_only="yes")


# --- the trainer ------------------------------------------------------------------------------------------------
def direct_generation(model, processor, records: list[dict], batch_size: int, **generate_kwargs
                      ) -> tuple[list[torch.Tensor], list[str]]:
    """New-token ids per batch and decoded answers, from the processor's prompts and `model.generate` alone."""
    decoder_only = model.config.use_decoder_only_language_model
    model.eval()
    ids, texts = [], []
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        inputs = processor(images=[r["image"] for r in chunk], text=[r["instruction"] for r in chunk],
                           padding_side="left" if decoder_only else "right", return_tensors="pt")
        generated = model.generate(**inputs, **generate_kwargs)
        prompt = inputs["input_ids"] if decoder_only else None
        texts += processor.post_process_generation(generated, prompt)
        ids.append(generated[:, inputs["input_ids"].shape[1]:] if decoder_only else generated)
    return ids, texts


def assert_predictions(predictions: np.ndarray, expected: list[torch.Tensor]) -> None:
    """`predictions` [N, W] (batches padded with -100 to one width) hold each batch's ids [B, N_b] and then -100."""
    row = 0
    for ids in expected:
        block = predictions[row:row + len(ids)]
        assert block[:, : ids.shape[1]].tolist() == ids.tolist()
        assert (block[:, ids.shape[1]:] == X).all()
        row += len(ids)
    assert row == len(predictions)


@pytest.mark.parametrize("kind", KINDS)
def test_evaluate_during_training_generates_from_prompts_and_scores(kind, tmp_path):
    processor = tiny.processor(kind)
    model = make_model(kind, processor)
    train, evaluation = make_records(TRAIN, seed=0), make_records(EVAL, seed=1)
    collator = InstructBlipDataCollator(processor, decoder_only=kind == "llama")
    seen: list[EvalPrediction] = []
    cider, exact = generation_metrics(processor, "cider"), generation_metrics(processor, "exact_match")

    def compute_metrics(prediction: EvalPrediction) -> dict[str, float]:
        seen.append(prediction)
        return {**cider(prediction), **exact(prediction)}

    trainer = InstructBlipTrainer(model=model, args=generation_args(tmp_path, max_steps=2, eval_strategy="steps",
                                                                    eval_steps=2),
                                  train_dataset=train, eval_dataset=evaluation, data_collator=collator,
                                  compute_metrics=compute_metrics)
    assert trainer.eval_data_collator.prompt_only and not trainer.data_collator.prompt_only
    trainer.train()
    assert trainer.data_collator is collator  # training batches kept the training layout
    logged = [entry for entry in trainer.state.log_history if "eval_cider" in entry]
    assert len(logged) == 1 and logged[0]["step"] == 2 and len(seen) == 1

    # The same prompts through the processor and `model.generate`, on the trained model.
    expected_ids, texts = direct_generation(model, processor, evaluation, batch_size=2, max_new_tokens=NEW_TOKENS)
    assert_predictions(seen[0].predictions, expected_ids)
    answers = [record["answer"] for record in evaluation]
    assert processor.tokenizer.batch_decode(np.where(seen[0].label_ids == X, 0, seen[0].label_ids),
                                            skip_special_tokens=True) == answers
    assert logged[0]["eval_cider"] == pytest.approx(cider_d(texts, [[a] for a in answers]).score, abs=1e-4)
    assert logged[0]["eval_exact_match"] == pytest.approx(exact_match_accuracy(texts, answers), abs=1e-4)

    # eval_loss is the training-layout loss of the same records (the answer never reaches `generate`).
    losses = [model(**collator(evaluation[i:i + 2])).loss.item() for i in (0, 2)]
    assert logged[0]["eval_loss"] == pytest.approx(float(np.mean(losses)), rel=1e-4)

    # References equal to half of the generations: a metric that is not 0, computed the same way.
    matched = [{**record, "answer": text if i % 2 == 0 and text else record["answer"]}
               for i, (record, text) in enumerate(zip(evaluation, texts))]
    output = trainer.predict(matched)
    assert_predictions(output.predictions, expected_ids)
    references = [record["answer"] for record in matched]
    assert output.metrics["test_exact_match"] == pytest.approx(exact_match_accuracy(texts, references), abs=1e-4)
    assert output.metrics["test_exact_match"] > 0 or not (texts[0] or texts[2])

    # Call-time generation arguments reach `generate`; records without answers predict without labels.
    unlabelled = [{k: v for k, v in record.items() if k != "answer"} for record in evaluation]
    short = trainer.predict(unlabelled, max_new_tokens=2)
    assert short.label_ids is None and "test_loss" not in short.metrics
    assert_predictions(short.predictions, direct_generation(model, processor, evaluation, 2, max_new_tokens=2)[0])


def test_generation_arguments_from_seq2seq_training_arguments(tmp_path):
    """`generation_max_length` / `generation_num_beams` reach `generate` as in `Seq2SeqTrainer`; call-time ones win."""
    processor = tiny.processor("t5")
    model = make_model("t5", processor)
    evaluation = make_records(EVAL[:2], seed=1)
    args = generation_args(tmp_path, generation_config=None, generation_max_length=3, generation_num_beams=2)
    trainer = InstructBlipTrainer(model=model, args=args, data_collator=InstructBlipDataCollator(processor, False))
    expected = direct_generation(model, processor, evaluation, 2, max_length=3, num_beams=2)[0]
    assert_predictions(trainer.predict(evaluation).predictions, expected)
    expected = direct_generation(model, processor, evaluation, 2, max_new_tokens=4, num_beams=1)[0]
    assert_predictions(trainer.predict(evaluation, max_new_tokens=4, num_beams=1).predictions, expected)


def test_trainer_refuses_answer_leaking_or_generation_without_predict_with_generate(tmp_path):
    processor = tiny.processor("llama")
    model = make_model("llama", processor)
    training = InstructBlipDataCollator(processor, decoder_only=True)
    with pytest.raises(ValueError, match="`eval_data_collator` lays out training sequences"):
        InstructBlipTrainer(model=model, args=generation_args(tmp_path), data_collator=training,
                            eval_data_collator=training)
    wrong_kind = InstructBlipDataCollator(tiny.processor("t5"), decoder_only=False, prompt_only=True)
    with pytest.raises(ValueError, match="`eval_data_collator` was built with decoder_only=False"):
        InstructBlipTrainer(model=model, args=generation_args(tmp_path), data_collator=training,
                            eval_data_collator=wrong_kind)
    plain = InstructBlipTrainer(model=model, args=TrainingArguments(str(tmp_path), report_to=[], use_cpu=True),
                                data_collator=training)
    assert plain.eval_data_collator is training  # without generation, evaluation batches are training batches
    with pytest.raises(TypeError, match=r"Generation arguments \['max_new_tokens'\].*predict_with_generate"):
        plain.evaluate(make_records(EVAL[:2], seed=1), max_new_tokens=3)


@pytest.mark.parametrize("kind", KINDS)
def test_evaluation_during_training_generates_what_the_runner_generates(kind, tmp_path):
    """The same records (GQA's evaluation prompt, the task's LAVIS short-answer preset, batches of 2) give the same
    answers from `InstructBlipTrainer.predict` with `predict_with_generate` and from the zero-shot runner."""
    processor = tiny.processor(kind)
    model = make_model(kind, processor).eval()
    questions = ["is this a cat or a dog ?", "what shape is shown ?", "what colour is the square ?"]
    records = [{"image": image, "question": q, "answer": "a dog ."}
               for image, q in zip(tiny.images(len(questions), seed=3), questions)]
    preset = task_spec("gqa").generation
    runner = evaluate(model, processor, records, "gqa", predictions_path=tmp_path / "gqa.jsonl", batch_size=2,
                      progress=False)
    from_runner = [row["prediction"] for row in read_predictions(tmp_path / "gqa.jsonl", "gqa").values()]
    assert runner["num_examples"] == 3 and len(from_runner) == 3

    prompts = [eval_prompt("gqa", record) for record in records]
    training_records = [{"image": r["image"], "instruction": p, "answer": r["answer"]} for r, p in zip(records, prompts)]
    trainer = InstructBlipTrainer(model=model, args=generation_args(tmp_path / "trainer"),
                                  data_collator=InstructBlipDataCollator(processor, decoder_only=kind == "llama"))
    predicted = trainer.predict(training_records, **preset).predictions
    pad = processor.tokenizer.pad_token_id
    from_trainer = [text.strip() for text in processor.tokenizer.batch_decode(
        np.where(predicted < 0, pad, predicted).tolist(), skip_special_tokens=True)]
    assert from_trainer == from_runner and any(from_runner)  # not all empty


# --- generation_metrics -------------------------------------------------------------------------------------------
def test_generation_metrics_decode_and_score():
    processor = tiny.processor("llama")
    tokenizer = processor.tokenizer
    predictions = ["a red circle .", "two .", "a dog ."]
    references = ["the circle is red .", "two .", "a dog ."]

    def ids(texts: list[str], width: int) -> np.ndarray:  # right padded with -100, as the evaluation loop pads
        rows = [tokenizer.encode(t, add_special_tokens=False) + [tokenizer.eos_token_id] for t in texts]
        return np.array([row + [X] * (width - len(row)) for row in rows])

    prediction = EvalPrediction(predictions=ids(predictions, 12), label_ids=ids(references, 10))
    assert generation_metrics(processor)(prediction) == {"exact_match": exact_match_accuracy(predictions, references)}
    assert generation_metrics(tokenizer, "cider")(prediction)["cider"] == pytest.approx(
        cider_d(predictions, [[r] for r in references], tokenize=caption_tokens).score)
    humans = [["red"] * 3, ["2"] * 10, ["dog"] * 2 + ["cat"] * 8]
    assert generation_metrics(processor, "vqa_accuracy", humans)(prediction) == {
        "vqa_accuracy": vqa_accuracy(predictions, humans)}

    with pytest.raises(ValueError, match="metric='vqa_accuracy'.*references"):
        generation_metrics(processor, "vqa_accuracy")
    with pytest.raises(ValueError, match=r"`metric` must be one of .*found 'bleu'"):
        generation_metrics(processor, "bleu")
    with pytest.raises(TypeError, match=r"`references\[0\]` must be a list of str for metric='cider'"):
        generation_metrics(processor, "cider", ["a dog"])
    with pytest.raises(ValueError, match="`predictions` must be token ids.*predict_with_generate"):
        generation_metrics(processor)(EvalPrediction(predictions=np.zeros((3, 4, 8)), label_ids=ids(references, 10)))
    with pytest.raises(ValueError, match="carry no labels"):
        generation_metrics(processor)(EvalPrediction(predictions=ids(predictions, 12), label_ids=None))


def test_generation_metrics_cider_is_the_runners():
    """Captions with case and punctuation: CIDEr logged during training equals the zero-shot runner's score of the
    same predictions (both tokenise as the runner does), and differs from a whitespace split (which the old
    training metric used)."""
    processor = tiny.processor("llama")
    tokenizer = processor.tokenizer
    predictions = ["A red Circle.", "two blue squares!", "A dog, running."]
    humans = [["a red circle", "The circle is RED."], ["Two squares, blue."], ["a dog runs", "A Dog is running!"]]
    encoded = [tokenizer.encode(t, add_special_tokens=False) for t in predictions]
    width = max(map(len, encoded))
    ids = np.array([row + [X] * (width - len(row)) for row in encoded])
    assert tokenizer.batch_decode(encoded) == predictions  # the tiny tokenizer round-trips case and punctuation
    during_training = generation_metrics(processor, "cider", humans)(EvalPrediction(predictions=ids, label_ids=None))
    examples = [Example(id=i, image=None, prompt="A short image description:", candidates=None, reference=refs)
                for i, refs in enumerate(humans)]
    runner = compute_metric("nocaps", examples, [{"prediction": p} for p in predictions])
    assert during_training["cider"] == pytest.approx(runner, abs=1e-12)
    assert runner != pytest.approx(cider_d(predictions, humans).score)
