"""Data-parallel evaluation: `python -m hf_instructblip.evaluate` on 2 CPU processes (torchrun, gloo) == one process.

The 2-process runs go through `_evaluate_worker.py` (the CLI's `main`, noting which ids each process computed). A
ranking task (float scores: a batch cut differently would show in the last bits) must give the one-process
predictions file byte for byte and the same metrics; a generation task is interrupted by killing one process after
its first batch, resumed, and must end where one uninterrupted process ends, each example computed exactly once.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import tiny
import torch

import _evaluate_worker
import hf_instructblip
from hf_instructblip import InstructBlipConfig, InstructBlipForConditionalGeneration, InstructBlipProcessor
from hf_instructblip import sync_image_token
from hf_instructblip.evaluate import cli
from hf_instructblip.evaluate.data_parallel import Processes, RowCounter, merge_parts, part_files

WORKER = Path(_evaluate_worker.__file__).resolve()
NUM_EXAMPLES = 7  # batches of 2: [1, 2] [3, 4] [5, 6] [7]; process 0 takes the 1st and 3rd, process 1 the others
QUESTIONS = ["what is in the picture ?", "how many shapes are there ?", "what colour is the circle ?",
             "what shape is shown ?", "is this a cat or a dog ?"]
OPTIONS = [["a red circle", "two"], ["three", "two shapes", "a cat"], ["red", "blue"], ["a square", "a star"],
           ["a dog", "a cat", "a small dog sitting"]]
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    """A saved tiny model and the data files of a ranking task (iconqa) and a generation task (vizwiz)."""
    folder = tmp_path_factory.mktemp("eval_dp")
    processor = InstructBlipProcessor(tiny.image_processor(), tiny.llm_tokenizer("llama"), tiny.qformer_tokenizer(),
                                      num_query_tokens=tiny.NUM_QUERY_TOKENS)
    model = tiny.randomize_(InstructBlipForConditionalGeneration(InstructBlipConfig(**tiny.config_kwargs("llama"))))
    sync_image_token(model, processor)
    model.save_pretrained(folder / "model")
    processor.save_pretrained(folder / "model")
    (folder / "images").mkdir()
    rows = {"iconqa": [], "vizwiz": []}
    for i, image in enumerate(tiny.images(NUM_EXAMPLES)):
        image.save(folder / "images" / f"{i}.png")
        question, options = QUESTIONS[i % 5], OPTIONS[i % 5]
        rows["iconqa"].append({"image": f"images/{i}.png", "question": question, "options": options,
                               "answer": options[-1]})
        rows["vizwiz"].append({"image": f"images/{i}.png", "question": question, "answers": [options[0]] * 10})
    for task, task_rows in rows.items():
        (folder / f"{task}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in task_rows))
    return {"folder": folder, "model": folder / "model"}


def cli_args(setup: dict[str, Path], task: str, out: Path) -> list[str]:
    return ["--model", str(setup["model"]), "--data", str(setup["folder"] / f"{task}.jsonl"), "--task", task,
            "--output-dir", str(out), "--batch-size", "2", "--num-beams", "2", "--max-new-tokens", "3",
            "--device", "cpu"]


def one_process(setup: dict[str, Path], task: str, out: Path, *extra: str) -> None:
    """The CLI in this process, on one thread like each torchrun process (CPU kernels may sum differently)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli.main([*cli_args(setup, task, out), "--no-progress", *extra]) == 0
    finally:
        torch.set_num_threads(threads)


def torchrun(plan: list[dict], folder: Path) -> subprocess.Popen:
    """The plan on 2 processes, started (`.communicate()` waits for it)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "plan.json").write_text(json.dumps(plan))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    package_root = str(Path(hf_instructblip.__file__).resolve().parents[1])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [package_root, str(WORKER.parent),
                                                       os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
               str(WORKER), str(folder / "plan.json")]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen) -> tuple[int, str]:
    """(exit status, stderr: where the processes' errors and the progress bar go)."""
    _, stderr = process.communicate(timeout=300)
    return process.returncode, stderr


def computed(folder: Path, tag: str, rank: int) -> list[list[int]]:
    path = folder / f"computed-{tag}-{rank}.json"
    return json.loads(path.read_text()) if path.exists() else []


def complete_ids(path: Path) -> list[int]:
    """The ids of the complete rows of a predictions file (a process killed while writing leaves a cut-off line)."""
    return [json.loads(line)["id"] for line in path.read_text().split("\n")[:-1]]


def without_path(metrics_file: Path) -> dict:
    metrics = json.loads(metrics_file.read_text())
    del metrics["predictions"]  # where each run wrote its file
    return metrics


@pytest.fixture(scope="module")
def runs(setup, tmp_path_factory):
    """Two torchrun launches: iconqa to the end + vizwiz killed in process 1 after its first batch; then vizwiz
    resumed. And the one-process runs of both."""
    work = tmp_path_factory.mktemp("runs")
    first = torchrun([{"tag": "rank", "argv": cli_args(setup, "iconqa", work / "dp")},
                      {"tag": "interrupted", "argv": cli_args(setup, "vizwiz", work / "dp"), "die": [1, 1]}],
                     work)
    try:  # while the processes run
        for task in ("iconqa", "vizwiz"):
            one_process(setup, task, work / "single")
    finally:
        status, first_err = finish(first)
    assert status != 0, "process 1 should have been killed"
    predictions = work / "dp" / "vizwiz_predictions.jsonl"
    after_kill = {path.name: complete_ids(path) for path in [predictions, *part_files(predictions)] if path.exists()}
    status, resumed_err = finish(torchrun([{"tag": "resumed", "argv": cli_args(setup, "vizwiz", work / "dp")}], work))
    assert status == 0, resumed_err[-6000:]
    return {"work": work, "first": first_err, "resumed": resumed_err, "after_kill": after_kill}


def test_two_processes_write_the_one_process_predictions_and_metrics(runs):
    work = runs["work"]
    ranked = (work / "dp" / "iconqa_predictions.jsonl").read_text()
    assert ranked == (work / "single" / "iconqa_predictions.jsonl").read_text()  # byte for byte, scores included
    assert without_path(work / "dp" / "iconqa_metrics.json") == without_path(work / "single" / "iconqa_metrics.json")
    # Each process computed its own batches, in the one-process batch cut.
    assert computed(work, "rank", 0) == [[1, 2], [5, 6]] and computed(work, "rank", 1) == [[3, 4], [7]]
    assert not part_files(work / "dp" / "iconqa_predictions.jsonl")  # merged, then deleted
    assert "7/7" in runs["first"]  # the progress bar (main process only) counts all processes' rows


def test_interrupted_run_resumes_each_shard_and_ends_like_one_process(runs):
    work, after_kill = runs["work"], runs["after_kill"]
    assert computed(work, "interrupted", 1) == [[3, 4]]  # killed right after its first batch
    # What the kill left: part files only (nothing merged); process 0 stopped wherever the kill found it.
    assert "vizwiz_predictions.jsonl" not in after_kill
    assert after_kill["vizwiz_predictions.part1-of-2.jsonl"] == [3, 4]
    assert after_kill.get("vizwiz_predictions.part0-of-2.jsonl", []) in ([], [1, 2], [1, 2, 5, 6])
    before = [i for ids in after_kill.values() for i in ids]
    done_before = len(before)

    after = [i for batch in computed(work, "resumed", 0) + computed(work, "resumed", 1) for i in batch]
    assert sorted(before + after) == list(range(1, NUM_EXAMPLES + 1))  # every example computed exactly once
    assert f"{done_before}/{NUM_EXAMPLES}" in runs["resumed"]  # the resumed bar starts at the global count
    predictions = (work / "dp" / "vizwiz_predictions.jsonl").read_text()
    assert predictions == (work / "single" / "vizwiz_predictions.jsonl").read_text()
    assert without_path(work / "dp" / "vizwiz_metrics.json") == without_path(work / "single" / "vizwiz_metrics.json")


def test_device_map_auto_gives_the_same_predictions(setup, runs, tmp_path):
    one_process(setup, "iconqa", tmp_path, "--device-map", "auto")
    single = runs["work"] / "single" / "iconqa_predictions.jsonl"
    assert (tmp_path / "iconqa_predictions.jsonl").read_text() == single.read_text()


def test_device_map_with_several_processes_is_refused_before_the_model_loads(setup, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "launched_processes", lambda: Processes(0, 2))
    assert cli.main([*cli_args(setup, "iconqa", tmp_path), "--device-map", "auto"]) == 2
    assert "`--device-map auto` spreads one process's model over every visible device; found 2" in \
        capsys.readouterr().err


# --- the pieces ---------------------------------------------------------------------------------------------------

def test_processes_take_every_world_size_th_batch_and_check_their_numbers():
    assert Processes(1, 3).take(list(range(8))) == [1, 4, 7]
    assert Processes().take([1, 2]) == [1, 2] and Processes().own_path(Path("p.jsonl")) == Path("p.jsonl")
    assert Processes(1, 2).own_path(Path("out/p.jsonl")) == Path("out/p.part1-of-2.jsonl")
    for rank, world_size in ((2, 2), (-1, 2), (0, 0), (True, 2)):
        with pytest.raises(ValueError, match="expected 0 <= `rank` < `world_size`"):
            Processes(rank, world_size)


def rows_file(path: Path, ids: list[int], tail: str = "") -> Path:
    path.write_text("".join(json.dumps({"id": i}) + "\n" for i in ids) + tail)
    return path


def read_ids(path: Path) -> dict[str, dict]:
    return {str(row["id"]): row for row in map(json.loads, path.read_text().splitlines())} if path.exists() else {}


def test_merge_appends_missing_rows_in_example_order_and_deletes_the_parts(tmp_path):
    main = rows_file(tmp_path / "t.jsonl", [1])
    rows_file(tmp_path / "t.part0-of-2.jsonl", [5, 3])
    rows_file(tmp_path / "t.part1-of-2.jsonl", [1, 9, 4])  # 1: merged before a kill, 9: not among the examples

    def append(path: Path, rows: list[dict]) -> None:
        with path.open("a") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in rows)

    assert merge_parts(main, ["1", "3", "4", "5"], read_ids, append)
    assert [json.loads(line)["id"] for line in main.read_text().splitlines()] == [1, 3, 4, 5, 9]
    assert not part_files(main)
    assert not merge_parts(main, ["1"], read_ids, append)  # nothing to merge


def test_row_counter_counts_complete_new_rows_only(tmp_path):
    part = rows_file(tmp_path / "t.part1-of-2.jsonl", [1, 2])
    counter = RowCounter([part, tmp_path / "t.part0-of-2.jsonl"])  # the second does not exist yet
    assert counter.new_rows() == 0
    rows_file(part, [1, 2, 3], tail='{"id": 4')  # a row being written
    assert counter.new_rows() == 1
    rows_file(part, [1, 2, 3, 4])
    rows_file(tmp_path / "t.part0-of-2.jsonl", [5])
    assert counter.new_rows() == 2
