"""Instruction-mixture builder: sources (lists of dicts, JSON-lines files) -> records, sampler, collator."""

from __future__ import annotations

import io
import json

import pytest
import tiny
import torch
from PIL import Image
from torch.utils.data import DataLoader

from hf_instructblip.json_lines import read_json_lines
from hf_instructblip.training.mixture import (
    InstructionDataset,
    MixtureSource,
    build_instruction_mixture,
)
from hf_instructblip.model.images import load_image
from hf_instructblip.templates import TEMPLATES


VALID_ROW = {"image": "a.png", "question": "q", "answer": "a"}


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def sources(tmp_path):
    """Captions held in memory as PIL images, VQA rows on disk as a JSON-lines file with relative paths."""
    pictures = tiny.images(6, seed=1)
    captions = [{"image": pictures[i], "caption": f"caption {i}"} for i in range(2)]
    (tmp_path / "images").mkdir()
    rows = []
    for i in range(4):
        pictures[2 + i].save(tmp_path / "images" / f"{i}.png")
        rows.append({"image": f"images/{i}.png", "question": f"question {i}", "answer": f"answer {i}"})
    path = tmp_path / "vqa.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n\n")
    return [MixtureSource("captions", captions, task="coco_caption"), MixtureSource("vqa", path, task="vqav2")], pictures


def test_builder_concatenates_sources_as_instruction_records(sources):
    sources, pictures = sources
    mixture = build_instruction_mixture(sources, seed=1)
    assert len(mixture.dataset) == 6 and mixture.collator is None
    assert mixture.sampler.names == ("captions", "vqa") and mixture.sampler.sizes == (2, 4)
    for k in range(6):
        item = mixture.dataset[k]
        assert sorted(item) == ["answer", "dataset", "image", "instruction"]
        assert item["image"].mode == "RGB"
        assert list(item["image"].getdata()) == list(pictures[k].getdata())  # the right picture, loaded
    assert mixture.dataset[0]["instruction"] in TEMPLATES["image_captioning"]
    assert mixture.dataset[0]["answer"] == "caption 0"
    assert mixture.dataset[3]["instruction"] in {t.format("question 1") for t in TEMPLATES["vqa"]}
    assert mixture.dataset[3]["answer"] == "answer 1"


def test_sampler_indices_and_record_names_agree(sources):
    sources, _ = sources
    # sqrt(2) : sqrt(4) with the vqa source doubled -> 1.414 : 4, 12 samples -> 3.13, 8.87 -> 3, 9
    mixture = build_instruction_mixture(sources, multipliers={"vqa": 2.0}, num_samples=12, seed=0)
    assert list(mixture.sampler.counts) == [3, 9]
    for index in mixture.sampler:
        assert mixture.dataset[index]["dataset"] == mixture.sampler.names[mixture.sampler.dataset_index(index)]


def test_dict_of_sources_uses_names_as_tasks():
    rows = [{"image": tiny.images(1)[0], "question": "q", "answer": "a"}]
    mixture = build_instruction_mixture({"okvqa": rows, "vqav2_qg": rows})
    assert mixture.dataset[0]["dataset"] == "okvqa" and mixture.dataset[1]["answer"] == "q"  # qg: target = question


def test_image_loading_accepts_datasets_byte_dicts_and_reports_missing_files(tmp_path):
    picture = tiny.images(1, seed=3)[0]
    loaded = load_image({"bytes": png_bytes(picture), "path": None})
    assert list(loaded.getdata()) == list(picture.getdata())
    with pytest.raises(ValueError, match="not found"):
        load_image("missing.png", tmp_path)
    with pytest.raises(TypeError, match="image"):
        load_image(3)


def test_bad_inputs_raise_clear_errors(tmp_path):
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"image": "a.png"}\n\n["a list"]\n')
    with pytest.raises(ValueError, match=r"broken.jsonl, line 3: expected a JSON object, found list"):
        read_json_lines(broken)
    broken.write_text('{"image": "a.png"}\nnot json\n')
    with pytest.raises(ValueError, match=r"broken.jsonl, line 2: malformed JSON"):
        read_json_lines(broken)
    broken.write_bytes(b'{"image": "a.png"}\n{"image": "\xff.png"}\n')
    with pytest.raises(ValueError, match=r"broken.jsonl, line 2: malformed JSON \(not UTF-8\)"):
        read_json_lines(broken)
    with pytest.raises(ValueError, match="task"):
        InstructionDataset([], task="nope")
    with pytest.raises(ValueError, match="sources"):
        build_instruction_mixture([])
    with pytest.raises(ValueError, match="distinct"):
        build_instruction_mixture([MixtureSource("a", [{}], task="vqa"), MixtureSource("a", [{}], task="vqa")])
    with pytest.raises(TypeError, match="MixtureSource"):
        build_instruction_mixture([("a", [])])
    with pytest.raises(ValueError, match="size 0"):  # an empty source under uniform weighting
        build_instruction_mixture([MixtureSource("a", [], task="vqa"), MixtureSource("b", [VALID_ROW], task="vqa")],
                                  alpha=0)


def tiny_processor():
    return tiny.processor("llama")


def test_collator_batches_feed_the_model(sources):
    collator_module = pytest.importorskip("hf_instructblip.training.collator")
    from hf_instructblip import InstructBlipConfig, InstructBlipForConditionalGeneration

    sources, _ = sources
    processor = tiny_processor()
    mixture = build_instruction_mixture(sources, processor=processor, decoder_only=True, num_samples=4,
                                        collator_kwargs={"max_input_length": 32})
    assert isinstance(mixture.collator, collator_module.InstructBlipDataCollator)
    batches = list(DataLoader(mixture.dataset, sampler=mixture.sampler, batch_size=2, collate_fn=mixture.collator))
    order = list(mixture.sampler)
    assert [name for batch in batches for name in batch["dataset"]] == \
        [mixture.sampler.names[mixture.sampler.dataset_index(i)] for i in order]

    config = InstructBlipConfig(**tiny.config_kwargs("llama", image_token_index=processor.image_token_id))
    model = tiny.randomize_(InstructBlipForConditionalGeneration(config)).eval()
    batch = {key: value for key, value in batches[0].items() if key != "dataset"}
    assert torch.isfinite(model(**batch).loss)

    with pytest.raises(ValueError, match="decoder_only"):
        build_instruction_mixture(sources, processor=processor)


@pytest.mark.parametrize(
    ("rows", "error", "pattern"),
    [
        ([{"image": "a.png", "question": "q", "answer": "a"}, {"image": "b.png", "question": "q"}], ValueError,
         r"src\[1\]: .*needs a non-empty 'answer'"),
        ([{"image": "a.png", "question": "q", "answer": ""}], ValueError, r"src\[0\]: .*needs a non-empty 'answer'"),
        ([{"question": "q", "answer": "a"}], ValueError, r"src\[0\]: expected an 'image'"),
        ([{"image": "a.png", "question": 3, "answer": "a"}], TypeError, r"src\[0\]: .*'question'.*expected a str"),
        (["not a dict"], TypeError, r"src\[0\]: expected a dict example, got str"),
    ],
    ids=["missing-answer", "empty-answer", "no-image", "int-question", "not-a-dict"],
)
def test_rows_are_checked_when_the_mixture_is_built(rows, error, pattern):
    with pytest.raises(error, match=pattern):
        build_instruction_mixture([MixtureSource("src", rows, task="vqa")])


def test_unreadable_image_files_name_the_source_and_row(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    data = InstructionDataset([{"image": "broken.png", "question": "q", "answer": "a"}], task="vqa", name="src",
                              image_root=tmp_path)
    with pytest.raises(ValueError, match=r"`src\[0\] image`: cannot read an image"):
        data[0]


def test_reading_and_checking_show_progress_that_changes_nothing(sources, capsys):
    from transformers.utils import logging as hf_logging

    sources, _ = sources
    path = sources[1].data
    enabled = hf_logging.is_progress_bar_enabled()
    try:
        hf_logging.enable_progress_bar()
        quiet = read_json_lines(path, progress=False)
        assert capsys.readouterr().err == ""
        assert read_json_lines(path) == quiet
        assert "reading vqa.jsonl" in capsys.readouterr().err
        shown = build_instruction_mixture(sources, seed=1)
        captured = capsys.readouterr()
        assert all(f"{what}" in captured.err for what in ("reading vqa.jsonl", "checking captions", "checking vqa"))
        assert captured.out == ""  # progress goes to stderr only
        hf_logging.disable_progress_bar()
        hidden = build_instruction_mixture(sources, seed=1)
        assert read_json_lines(path) == quiet and capsys.readouterr().err == ""
    finally:
        (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    assert [shown.dataset[k]["instruction"] for k in range(6)] == [hidden.dataset[k]["instruction"] for k in range(6)]
    assert list(shown.sampler) == list(hidden.sampler)


def test_multitask_ablations_replace_the_templates_with_the_raw_input(sources):
    """The paper's Table 4 baselines: the same records, answers and draws, with the raw input alone ("none") or the
    raw input after "[category:dataset]" ("dataset_name") instead of a template; streaming sources take it too."""
    from dataclasses import replace

    from hf_instructblip import build_streaming_mixture

    sources, _ = sources
    styled = {style: build_instruction_mixture([replace(s, instructions=style) for s in sources], seed=1).dataset
              for style in ("templates", "none", "dataset_name")}
    for k in range(6):
        rows = {style: dataset[k] for style, dataset in styled.items()}
        assert len({row["answer"] for row in rows.values()}) == 1  # the same caption / answer drawn
    assert styled["none"][0]["instruction"] == ""  # a caption's raw input is the image alone
    from hf_instructblip import InstructBlipDataCollator

    batch = InstructBlipDataCollator(tiny.processor("llama"), decoder_only=True)([styled["none"][0]])
    unlabelled = (batch["labels"][0] == -100).sum().item()
    assert unlabelled == tiny.NUM_QUERY_TOKENS + 1  # [image x Q][bos][answer eos]: no prompt token at all
    assert styled["none"][3]["instruction"] == "question 1"
    assert styled["dataset_name"][0]["instruction"] == "[image_captioning:captions]"
    assert styled["dataset_name"][3]["instruction"] == "[vqa:vqa] question 1"  # not a paper dataset name: family
    stream = build_streaming_mixture([replace(s, instructions="none") for s in sources], probabilities=[0, 1]).dataset
    assert next(iter(stream))["instruction"] == "question 0"
    with pytest.raises(ValueError, match=r"`sources\[1\].instructions` must be one of \['templates', 'none', "):
        build_instruction_mixture([sources[0], replace(sources[1], instructions="plain")])
