"""`datasets` plumbing: undecoded image rows everywhere, DatasetDicts refused, streaming mixtures, column mapping.

The oracles are independent of the code under test: pixels of the PIL images the rows were made from, templates
drawn by `make_instruction_record` for the expected fields, and probabilities worked out by hand.
"""

from __future__ import annotations

import itertools
import json
import types
from collections import Counter

import numpy as np
import pytest
import tiny
import torch
from PIL import Image
from torch.utils.data import DataLoader

datasets = pytest.importorskip("datasets")

from hf_instructblip import InstructBlipDataCollator, InstructionDataset, make_instruction_record  # noqa: E402
from hf_instructblip.evaluate.runner import example_inputs  # noqa: E402
from hf_instructblip.evaluate.tasks import prepare_examples  # noqa: E402
from hf_instructblip.model.images import load_image  # noqa: E402
from hf_instructblip.training.mixture import (  # noqa: E402
    MixtureSource,
    build_instruction_mixture,
    most_frequent_answer,
)
from hf_instructblip.training.streaming import StreamingInstructionMixture, build_streaming_mixture  # noqa: E402

SEED = 5


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def qa_rows(n: int, seed: int = 0) -> list[dict]:
    """`n` rows with distinct PIL images, "question i" and "answer i"."""
    return [{"image": image, "question": f"question {i}", "answer": f"answer {i}"}
            for i, image in enumerate(tiny.images(n, seed=seed))]


def row_number(record: dict) -> int:
    return int(record["answer"].split()[-1])


def expected_record(rows: list[dict], index: int, task: str, name: str) -> dict:
    """What the map-style path makes of rows[index]: the oracle for the streaming path."""
    return make_instruction_record(rows[index], task, seed=SEED, index=index, dataset=name)


# --- (a) datasets.Image(decode=False) rows ---------------------------------------------------------------------
def test_undecoded_rows_give_the_same_pixels_in_processor_collator_mixture_and_runner(tmp_path):
    pictures = tiny.images(2, seed=7)
    pictures[1].save(tmp_path / "b.png")
    undecoded = datasets.Dataset.from_list([{"image": pictures[0], "question": "q", "answer": "a"}]).cast_column(
        "image", datasets.Image(decode=False))
    embedded = undecoded[0]["image"]
    assert isinstance(embedded["bytes"], bytes) and embedded["path"] is None  # what decode=False gives
    by_path = {"bytes": None, "path": "b.png"}  # local-file rows: no bytes, a path (relative to image_root)

    assert np.array_equal(pixels(load_image(embedded)), pixels(pictures[0]))
    assert np.array_equal(pixels(load_image(by_path, tmp_path)), pixels(pictures[1]))
    assert np.array_equal(pixels(load_image({"bytes": b"", "path": str(tmp_path / "b.png")})), pixels(pictures[1]))

    processor = tiny.processor("llama")
    expected = processor.preprocess_images([pictures[0]])  # [1, 3, 28, 28]
    from_dict = processor(images=embedded, text="q", return_tensors="pt")["pixel_values"]
    collated = InstructBlipDataCollator(processor, decoder_only=True)(
        [{"image": embedded, "instruction": "q", "answer": "a"}])["pixel_values"]
    mixture = build_instruction_mixture([MixtureSource("vqa", undecoded, task="vqav2")], processor=processor,
                                        decoder_only=True)
    mixed = mixture.collator([mixture.dataset[0]])["pixel_values"]
    examples = prepare_examples("gqa", [{"image": embedded, "question": "q", "answer": "a"}])
    fake_model = types.SimpleNamespace(device=torch.device("cpu"), dtype=torch.float32)
    evaluated = example_inputs(fake_model, processor, examples)["pixel_values"]
    for result in (from_dict, collated, mixed, evaluated):
        torch.testing.assert_close(result, expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("image", "error", "pattern"),
    [
        ({"bytes": b"not an image", "path": None}, ValueError,
         r"`image`: cannot read an image from 12 bytes \(expected an image file's bytes"),
        ({"bytes": None, "path": "missing.png"}, ValueError, r"image file not found: .*missing.png"),
        ({"bytes": "text", "path": None}, TypeError, r"'bytes' must be bytes or None, found str"),
        ({"bytes": None, "path": 3}, TypeError, r"'path' must be a str or None, found int"),
        ({"url": "http://x/a.png"}, ValueError, r"expected non-empty 'bytes' or a 'path'.*found \{'url': str\}"),
    ],
    ids=["garbage-bytes", "missing-path", "str-bytes", "int-path", "other-keys"],
)
def test_bad_image_dicts_are_refused_clearly(tmp_path, image, error, pattern):
    with pytest.raises(error, match=pattern):
        load_image(image, tmp_path)


# --- (b) DatasetDict ----------------------------------------------------------------------------------------------
def test_dataset_dicts_are_refused_with_their_splits():
    rows = qa_rows(2)
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                                   "validation": datasets.Dataset.from_list(rows)})
    pattern = r"MixtureSource 'vqa': data is a DatasetDict with splits \['train', 'validation'\]; pass one split, " \
              r"e.g. data=dd\['train'\]"
    with pytest.raises(TypeError, match=pattern):
        build_instruction_mixture([MixtureSource("vqa", splits, task="vqav2")])
    with pytest.raises(TypeError, match=pattern):
        build_streaming_mixture([MixtureSource("vqa", splits, task="vqav2")], probabilities=[1.0])
    streamed = datasets.IterableDatasetDict({"test": splits["train"].to_iterable_dataset()})
    with pytest.raises(TypeError, match=r"IterableDatasetDict with splits \['test'\]; .*data=dd\['test'\]"):
        build_streaming_mixture([MixtureSource("vqa", streamed, task="vqav2")], probabilities=[1.0])
    with pytest.raises(TypeError, match=r"MixtureSource 'vqa': data: expected a dataset of dict rows .*got a dict "
                                        r"with keys \['question'\]"):
        build_instruction_mixture([MixtureSource("vqa", {"question": ["q"]}, task="vqav2")])
    with pytest.raises(TypeError, match=r"vqa: data: expected a map-style dataset .*got IterableDataset; .*"
                                        r"build_streaming_mixture"):
        build_instruction_mixture([MixtureSource("vqa", splits["train"].to_iterable_dataset(), task="vqav2")])


# --- (c) streaming ----------------------------------------------------------------------------------------------
def test_a_stream_yields_the_map_style_records_pass_after_pass():
    rows = qa_rows(3)
    streamed = datasets.Dataset.from_list(rows).to_iterable_dataset()
    stream = StreamingInstructionMixture([MixtureSource("vqa", streamed, task="vqav2")], probabilities=[1.0],
                                         seed=SEED)
    mapped = InstructionDataset(rows, "vqav2", name="vqa", seed=SEED)
    records = list(itertools.islice(stream, 7))
    assert [row_number(r) for r in records] == [0, 1, 2, 0, 1, 2, 0]  # restarts when the source ends
    for record in records:
        expected = mapped[row_number(record)]
        assert {k: record[k] for k in ("instruction", "answer", "dataset")} == \
            {k: expected[k] for k in ("instruction", "answer", "dataset")}
        assert np.array_equal(pixels(record["image"]), pixels(rows[row_number(record)]["image"]))
    assert len({r["instruction"] for r in records[:3]}) > 1  # templates vary by row, not one for all


def test_probabilities_follow_the_balanced_rule_and_the_draws_follow_them():
    small, large = qa_rows(4), qa_rows(16, seed=1)
    sources = [MixtureSource("small", small, task="vqav2"), MixtureSource("large", large, task="okvqa")]
    assert StreamingInstructionMixture(sources).probabilities == (1 / 3, 2 / 3)  # sqrt 2 : 4
    assert StreamingInstructionMixture(sources, multipliers={"small": 2.0}).probabilities == (0.5, 0.5)
    assert StreamingInstructionMixture(sources, size_cap=4).probabilities == (0.5, 0.5)
    assert StreamingInstructionMixture(sources, alpha=1.0).probabilities == (0.2, 0.8)

    stream = StreamingInstructionMixture(sources, probabilities={"small": 1, "large": 3}, seed=SEED)
    assert stream.probabilities == (0.25, 0.75)
    draws = list(itertools.islice(stream.choices(), 8000))
    assert abs(draws.count(0) / 8000 - 0.25) < 0.015  # 8000 draws: standard error 0.005
    again = StreamingInstructionMixture(sources, probabilities={"small": 1, "large": 3}, seed=SEED)
    other = StreamingInstructionMixture(sources, probabilities={"small": 1, "large": 3}, seed=SEED + 1)
    assert list(itertools.islice(again.choices(), 200)) == draws[:200]
    assert list(itertools.islice(other.choices(), 200)) != draws[:200]

    records = list(itertools.islice(stream, 24))
    assert [r["dataset"] for r in records] == [("small", "large")[d] for d in draws[:24]]
    for name, rows, task in (("small", small, "vqav2"), ("large", large, "okvqa")):
        mine = [r for r in records if r["dataset"] == name]
        assert [row_number(r) for r in mine] == [k % len(rows) for k in range(len(mine))]  # each in its order
        assert [r["instruction"] for r in mine] == \
            [expected_record(rows, row_number(r), task, name)["instruction"] for r in mine]


def test_unknown_sizes_need_explicit_probabilities():
    iterable = datasets.Dataset.from_list(qa_rows(2)).to_iterable_dataset()
    sources = [MixtureSource("a", qa_rows(2), task="vqav2"), MixtureSource("b", iterable, task="vqav2")]
    with pytest.raises(ValueError, match=r"probabilities: the sizes of \['b'\] are unknown .*pass "
                                         r"probabilities=\{name: p\}"):
        StreamingInstructionMixture(sources)
    with pytest.raises(ValueError, match=r"probabilities: expected one per dataset \[.a., .b.\], got keys \[.a.\]"):
        StreamingInstructionMixture(sources, probabilities={"a": 1.0})
    with pytest.raises(ValueError, match=r"probabilities: expected either probabilities or multipliers"):
        StreamingInstructionMixture(sources, probabilities=[1, 1], multipliers=[1, 2])
    with pytest.raises(ValueError, match=r"`probabilities\[1\]` must be a finite number >= 0, found -1"):
        StreamingInstructionMixture(sources, probabilities=[1, -1])
    with pytest.raises(TypeError, match=r"MixtureSource 'g': .*can be iterated again .*\(a one-shot iterator\)"):
        StreamingInstructionMixture([MixtureSource("g", iter(qa_rows(1)), task="vqav2")], probabilities=[1])
    stream = StreamingInstructionMixture([MixtureSource("e", [], task="vqav2")], probabilities=[1])
    with pytest.raises(ValueError, match=r"MixtureSource 'e': the source yielded no rows"):
        next(iter(stream))


def test_dataloader_workers_read_distinct_shares(tmp_path):
    """Worker w draws from `choices(w, 2)`; a list or a JSON-lines file gives it rows w, w + 2, ...; a
    datasets.IterableDataset with two shards gives it one shard. DataLoader alternates workers, so records 0, 2, 4,
    ... come from worker 0."""
    listed, sharded = qa_rows(6), qa_rows(6, seed=1)
    lines = []
    for i, row in enumerate(listed):
        row["image"].save(tmp_path / f"{i}.png")
        lines.append(json.dumps({**row, "image": f"{i}.png"}))
    (tmp_path / "rows.jsonl").write_text("\n".join(lines) + "\n")
    sources = [MixtureSource("listed", listed, task="vqav2"),
               MixtureSource("lines", str(tmp_path / "rows.jsonl"), task="vqav2"),
               MixtureSource("sharded", datasets.Dataset.from_list(sharded).to_iterable_dataset(num_shards=2),
                             task="vqav2")]
    stream = StreamingInstructionMixture(sources, probabilities=[1, 1, 2], seed=SEED)
    loader = DataLoader(stream, batch_size=None, num_workers=2, collate_fn=lambda record: record)
    records = list(itertools.islice(loader, 64))
    seen_sharded = []
    for worker in (0, 1):
        mine = records[worker::2]
        names = [stream.names[d] for d in itertools.islice(stream.choices(worker, 2), len(mine))]
        assert [r["dataset"] for r in mine] == names
        for name in ("listed", "lines"):
            rows = [row_number(r) for r in mine if r["dataset"] == name]
            assert len(rows) > 3 and rows == [(worker + 2 * k) % 6 for k in range(len(rows))]
        for r in mine:
            if r["dataset"] != "sharded":  # the template index is the row number, as in the map-style path
                expected = expected_record(listed, row_number(r), "vqav2", r["dataset"])["instruction"]
                assert r["instruction"] == expected
                assert np.array_equal(pixels(r["image"]), pixels(listed[row_number(r)]["image"]))
        sharded_rows = [row_number(r) for r in mine if r["dataset"] == "sharded"]
        passes = [sharded_rows[k : k + 3] for k in range(0, len(sharded_rows) - 2, 3)]
        assert len(passes) >= 2 and all(rows in ([0, 1, 2], [3, 4, 5]) for rows in passes)  # a whole shard a pass
        seen_sharded.append(passes[0])
    assert sorted(seen_sharded[0] + seen_sharded[1]) == list(range(6))  # pass 0: one shard each, no overlap


def test_trainer_trains_on_a_stream_with_max_steps(tmp_path):
    from transformers import TrainingArguments

    from hf_instructblip import InstructBlipConfig, InstructBlipForConditionalGeneration, InstructBlipTrainer

    processor = tiny.processor("llama")
    rows = [{"image": image, "question": "what colour is the circle ?", "answer": "red ."}
            for image in tiny.images(3)]
    mixture = build_streaming_mixture(
        [MixtureSource("vqa", datasets.Dataset.from_list(rows).to_iterable_dataset(), task="vqav2"),
         MixtureSource("caption", [{"image": image, "caption": "a red circle ."} for image in tiny.images(2)],
                       task="coco_caption")],
        probabilities={"vqa": 0.5, "caption": 0.5}, processor=processor, decoder_only=True, seed=SEED)
    assert mixture.sampler is None

    consumed = []

    class Recording(InstructBlipTrainer):
        def compute_loss(self, model, inputs, *args, **kwargs):
            consumed.extend(inputs["dataset"])
            return super().compute_loss(model, inputs, *args, **kwargs)

    config = InstructBlipConfig(**tiny.config_kwargs("llama", image_token_index=processor.image_token_id))
    model = tiny.randomize_(InstructBlipForConditionalGeneration(config))
    args = TrainingArguments(str(tmp_path), max_steps=2, per_device_train_batch_size=2, report_to=[],
                             save_strategy="no", logging_steps=1, use_cpu=True, dataloader_num_workers=0)
    trainer = Recording(model, args, train_dataset=mixture.dataset, train_sampler=mixture.sampler,
                        data_collator=mixture.collator)
    result = trainer.train()
    assert trainer.state.global_step == 2 and np.isfinite(result.training_loss)
    assert consumed == [r["dataset"] for r in itertools.islice(mixture.dataset, 4)]
    # accelerate's default for iterable data (rank 0 concatenates every rank's batch) cannot take our batches
    assert trainer.args.accelerator_config.dispatch_batches is False
    assert args.accelerator_config.dispatch_batches is None  # the caller's arguments are left as they were
    explicit = TrainingArguments(str(tmp_path), max_steps=2, report_to=[], use_cpu=True,
                                 accelerator_config={"dispatch_batches": True})
    for call in ({"args": explicit}, {}):  # keyword or positional: the user's own choice is kept
        trainer = InstructBlipTrainer(model, *([] if call else [explicit]), train_dataset=mixture.dataset,
                                      data_collator=mixture.collator, **call)
        assert trainer.args.accelerator_config.dispatch_batches is True
    mapped = InstructBlipTrainer(model, args, train_dataset=rows, data_collator=mixture.collator)
    assert mapped.args.accelerator_config.dispatch_batches is None  # map-style data: untouched


# --- (d) column mapping ---------------------------------------------------------------------------------------
VQAV2_ANSWERS = [["blue", "red", "blue", "red"], ["yes", "no", "no"], ["2"]]  # -> blue (tie: first), no, 2


def vqav2_rows() -> list[dict]:
    """HF VQAv2's columns: `answers` a list of {answer, answer_confidence, answer_id} dicts."""
    return [{"image": image, "q_text": f"question {i}", "multiple_choice_answer": f"choice {i}",
             "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1} for j, a in enumerate(answers)]}
            for i, (image, answers) in enumerate(zip(tiny.images(3), VQAV2_ANSWERS))]


@pytest.mark.parametrize(("answer_column", "answers"), [
    ("answers", ["blue", "no", "2"]),
    ("multiple_choice_answer", ["choice 0", "choice 1", "choice 2"]),
])
def test_vqav2_columns_map_to_records(answer_column, answers):
    rows = vqav2_rows()
    columns = {"question": "q_text", "answer": answer_column}
    hf_rows = datasets.Dataset.from_list(rows).cast_column("image", datasets.Image(decode=False))
    mixture = build_instruction_mixture([MixtureSource("vqa", hf_rows, task="vqav2", columns=columns)], seed=SEED)
    stream = StreamingInstructionMixture([MixtureSource("vqa", datasets.Dataset.from_list(rows).to_iterable_dataset(),
                                                        task="vqav2", columns=columns)], probabilities=[1], seed=SEED)
    streamed = list(itertools.islice(stream, 3))
    for i in range(3):
        expected = make_instruction_record({"image": None, "question": f"question {i}", "answer": answers[i]},
                                           "vqav2", seed=SEED, index=i, dataset="vqa")
        for record in (mixture.dataset[i], streamed[i]):
            assert (record["instruction"], record["answer"]) == (expected["instruction"], answers[i])
            assert np.array_equal(pixels(record["image"]), pixels(rows[i]["image"]))


def test_most_frequent_answer_rule():
    assert most_frequent_answer(["b", "a", "b", "a"]) == "b"  # tie: the one that comes first
    assert most_frequent_answer(["a", "b", "b"]) == "b"
    assert most_frequent_answer([{"answer": "x"}, {"answer": "y"}, "y"]) == "y"
    assert most_frequent_answer({"answer": ["p", "q", "q"], "answer_id": [1, 2, 3]}) == "q"  # a Sequence of dicts
    assert most_frequent_answer("plain") == "plain" and most_frequent_answer([]) == []
    with pytest.raises(TypeError, match=r"answer\[1\]: expected a str or an \{'answer': str\} dict, got int 3"):
        most_frequent_answer(["a", 3])


def test_other_field_names_map_too(tmp_path):
    pictures = tiny.images(2)
    rows = [{"img": picture, "text": f"caption {i}"} for i, picture in enumerate(pictures)]
    hf_rows = datasets.Dataset.from_list(rows).cast_column("img", datasets.Image(decode=False))
    mixture = build_instruction_mixture(
        [MixtureSource("cap", hf_rows, task="coco_caption", columns={"image": "img", "caption": "text"})])
    assert [mixture.dataset[i]["answer"] for i in range(2)] == ["caption 0", "caption 1"]
    assert np.array_equal(pixels(mixture.dataset[1]["image"]), pixels(pictures[1]))


def test_missing_or_unknown_columns_name_the_source_and_the_column():
    rows = qa_rows(2)
    with pytest.raises(ValueError, match=r"MixtureSource 'vqa': columns\['question'\] = 'q_text', but the source has "
                                         r"no column 'q_text'; its columns are \['image', 'question', 'answer'\]"):
        build_instruction_mixture([MixtureSource("vqa", datasets.Dataset.from_list(rows), task="vqav2",
                                                 columns={"question": "q_text"})])
    listed = [{**rows[0], "q_text": "q"}, rows[1]]
    with pytest.raises(ValueError, match=r"vqa\[1\]: column 'q_text' \(mapped to 'question' by columns\) is missing"):
        build_instruction_mixture([MixtureSource("vqa", listed, task="vqav2", columns={"question": "q_text"})])
    stream = StreamingInstructionMixture([MixtureSource("vqa", listed[1:], task="vqav2",
                                                        columns={"question": "q_text"})], probabilities=[1])
    with pytest.raises(ValueError, match=r"vqa\[0\]: column 'q_text' \(mapped to 'question' by columns\)"):
        next(iter(stream))
    with pytest.raises(ValueError, match=r"MixtureSource 'vqa': columns: expected record fields from \['image', "
                                         r".*got 'answers'"):
        build_instruction_mixture([MixtureSource("vqa", rows, task="vqav2", columns={"answers": "answer"})])
