"""`python -m hf_instructblip.evaluate --suite paper`: every held-out task, prepared from samples in its official format
(`evaluate.prepare`), evaluated on a saved tiny model; one table beside the paper's numbers, the same after an
interruption and resume, and the same on 2 processes (torchrun, gloo) as on one."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import tiny
import torch
from PIL import Image

import test_evaluate_distributed as dp
from hf_instructblip import InstructBlipConfig, InstructBlipForConditionalGeneration, sync_image_token
from hf_instructblip.evaluate import cli
from hf_instructblip.evaluate.paper import paper_zero_shot
from hf_instructblip.evaluate.prepare import prepare_dataset
from hf_instructblip.evaluate.suite import paper_llm_of
from hf_instructblip.templates import HELD_OUT
from test_prepare import BUILDERS

VIDEO = ("msvd_qa", "msrvtt_qa", "ivqa")


@pytest.fixture(scope="module")
def suite(tmp_path_factory) -> dict[str, Path]:
    """A saved tiny model and every held-out task prepared from its official-format sample."""
    root = tmp_path_factory.mktemp("suite")
    data = root / "data"
    for task in HELD_OUT:
        kwargs, _, _ = BUILDERS[task](root / "official" / task)
        prepare_dataset(task, output=data / f"{task}.jsonl", progress=False, **kwargs)
    records = [json.loads(line) for line in (data / "hateful_memes.jsonl").read_text().splitlines()]
    twin = {**records[0], "id": f"{records[0]['id']}-twin", "label": 1 - records[0]["label"]}  # AUC needs both
    (data / "hateful_memes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [*records, twin]))
    for task in VIDEO:  # the video processor samples 4 frames per clip: give every clip a fourth
        for line in (data / f"{task}.jsonl").read_text().splitlines():
            folder = data / json.loads(line)["video"]
            Image.new("RGB", (8, 8), (30, 30, 200)).save(folder / "00004.jpg")
    processor = tiny.processor("llama")
    model = tiny.randomize_(InstructBlipForConditionalGeneration(InstructBlipConfig(**tiny.config_kwargs("llama"))))
    sync_image_token(model, processor)
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    return {"root": root, "data": data, "model": root / "model"}


def suite_args(suite: dict[str, Path], out: Path, data: Path | None = None) -> list[str]:
    return ["--suite", "paper", "--model", str(suite["model"]), "--data-dir", str(data or suite["data"]), "--output-dir",
            str(out), "--paper-llm", "vicuna-7b", "--batch-size", "2", "--num-beams", "2", "--max-new-tokens", "3",
            "--device", "cpu", "--no-progress"]


def run_here(suite: dict[str, Path], out: Path, data: Path | None = None) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun process
    try:
        assert cli.main(suite_args(suite, out, data)) == 0
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def first_run(suite) -> Path:
    out = suite["root"] / "one"
    run_here(suite, out)
    return out


def test_suite_writes_one_table_beside_the_papers(first_run):
    rows = list(csv.DictReader((first_run / "paper_suite.csv").open()))
    assert [row["task"] for row in rows] == list(HELD_OUT)
    by_task = {row["task"]: row for row in rows}
    for task in HELD_OUT:
        row = by_task[task]
        metrics = json.loads((first_run / f"{task}_metrics.json").read_text())
        assert row["status"] == "done" and float(row["ours"]) == round(100 * metrics["score"], 2)
        paper = paper_zero_shot(task, "vicuna-7b")
        assert row["paper (vicuna-7b)"] == ("" if paper is None else str(paper))
        if paper is not None:
            assert float(row["difference"]) == pytest.approx(float(row["ours"]) - paper, abs=0.011)
    markdown = (first_run / "paper_suite.md").read_text()
    assert markdown.splitlines()[0].startswith("| task | metric | examples | ours | paper (vicuna-7b) |")
    timing = json.loads((first_run / "paper_suite_timing.json").read_text())
    assert set(timing) == set(HELD_OUT)
    assert all(t["examples"] >= 1 and t["examples_per_second"] > 0 for t in timing.values())


def test_tasks_without_data_are_listed_as_skipped(suite, first_run, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    records = [json.loads(line) for line in (suite["data"] / "gqa.jsonl").read_text().splitlines()]
    for record in records:  # image paths are relative to the data file: make them absolute for the copy
        record["image"] = str((suite["data"] / record["image"]).resolve())
    (data / "gqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    run_here(suite, tmp_path / "out", data)
    rows = {row["task"]: row for row in csv.DictReader((tmp_path / "out" / "paper_suite.csv").open())}
    assert rows["gqa"]["status"] == "done" and rows["gqa"]["ours"] == next(
        row["ours"] for row in csv.DictReader((first_run / "paper_suite.csv").open()) if row["task"] == "gqa")
    assert all(rows[task]["status"] == f"skipped: no {task}.jsonl in {data}" and rows[task]["ours"] == ""
               for task in set(HELD_OUT) - {"gqa"})


def test_suite_resumes_after_an_interruption_with_the_same_table(suite, first_run, tmp_path):
    out = tmp_path / "resumed"
    out.mkdir()
    for task in ("gqa", "visdial", "msvd_qa"):  # killed mid-way: some rows written, no metrics yet
        kept = (first_run / f"{task}_predictions.jsonl").read_text().splitlines()[:1]
        (out / f"{task}_predictions.jsonl").write_text(kept[0] + "\n")
    run_here(suite, out)
    assert (out / "paper_suite.csv").read_text() == (first_run / "paper_suite.csv").read_text()
    timing = json.loads((out / "paper_suite_timing.json").read_text())
    assert timing["gqa"]["examples"] == json.loads((first_run / "gqa_metrics.json").read_text())["num_examples"] - 1


def test_suite_on_two_processes_gives_the_same_table(suite, first_run, tmp_path):
    status, stderr = dp.finish(dp.torchrun([{"tag": "suite", "argv": suite_args(suite, tmp_path / "two")}],
                                           tmp_path / "work"))
    assert status == 0, stderr[-3000:]
    assert (tmp_path / "two" / "paper_suite.csv").read_text() == (first_run / "paper_suite.csv").read_text()


def test_suite_arguments_are_checked_before_the_model_loads(suite, tmp_path, capsys):
    args = suite_args(suite, tmp_path)
    assert cli.main([*args, "--task", "gqa"]) == 2
    assert "leave --task and --data out" in capsys.readouterr().err
    assert cli.main([a if a != str(suite["data"]) else str(tmp_path / "none") for a in args]) == 2
    assert "--data-dir" in capsys.readouterr().err
    assert paper_llm_of("Salesforce/instructblip-vicuna-13b") == "vicuna-13b" and paper_llm_of("me/model") is None
    official = [a if a != str(suite["model"]) else "Salesforce/instructblip-flan-t5-xl" for a in args]
    assert cli.main(official) == 2  # --paper-llm vicuna-7b against the Flan-T5-XL checkpoint's own row
    assert "`--paper-llm vicuna-7b` compares Salesforce/instructblip-flan-t5-xl (the paper's flan-t5-xl row)" in \
        capsys.readouterr().err


def test_resuming_with_other_settings_is_refused_not_mixed(suite, first_run, capsys):
    """The first run's predictions were made with 2 beams: a rerun into the same folder with 3 would append rows
    from other settings to them (and label them with one table); it is refused before the model loads."""
    args = suite_args(suite, first_run)
    args[args.index("--num-beams") + 1] = "3"
    before = (first_run / "paper_suite.csv").read_text()
    assert cli.main(args) == 2
    assert "_predictions.jsonl was made with" in capsys.readouterr().err
    assert (first_run / "paper_suite.csv").read_text() == before
