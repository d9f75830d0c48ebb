"""Evaluation runner: the CLI end to end, resume after an interruption (and refusal when the data changed), metrics
recomputed from the predictions file, malformed lines reported by number, the task table, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tiny
import torch

from hf_instructblip import (
    InstructBlipConfig,
    InstructBlipForConditionalGeneration,
    InstructBlipProcessor,
    sync_image_token,
)
from hf_instructblip.evaluate.cli import main
from hf_instructblip.evaluate.runner import evaluate, read_predictions
from hf_instructblip.evaluate.tasks import SCORERS, TASKS, load_records, prepare_examples
from hf_instructblip.templates import HELD_OUT, HELD_OUT_METRICS, RANKING_DATASETS

QUESTIONS = ["what is in the picture ?", "how many shapes are there ?", "what colour is the circle ?",
             "what shape is shown ?", "is this a cat or a dog ?"]
OPTIONS = [["a red circle", "two"], ["three", "two shapes", "a cat"], ["red", "blue"], ["a square", "a star"],
           ["a dog", "a cat", "a small dog sitting"]]
# The decoder-only generation preset with fewer beams and tokens, so the tiny runs stay fast.
FAST = dict(num_beams=2, max_new_tokens=3, min_new_tokens=1, length_penalty=-1.0, do_sample=False)


def build(kind: str) -> tuple[InstructBlipForConditionalGeneration, InstructBlipProcessor]:
    processor = InstructBlipProcessor(tiny.image_processor(), tiny.llm_tokenizer(kind), tiny.qformer_tokenizer(),
                                      num_query_tokens=tiny.NUM_QUERY_TOKENS)
    model = InstructBlipForConditionalGeneration(InstructBlipConfig(**tiny.config_kwargs(kind)))
    tiny.randomize_(model)
    sync_image_token(model, processor)
    return model.eval(), processor


@pytest.fixture(scope="module")
def llama():
    return build("llama")


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("data")
    (folder / "images").mkdir()
    for i, image in enumerate(tiny.images(len(QUESTIONS))):
        image.save(folder / "images" / f"{i}.png")
    return folder


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def reference_answers(model, processor, folder: Path, prompts: list[str]) -> list[str]:
    """Each example generated alone (no padding) straight through `model.generate`: what the runner must write."""
    from PIL import Image

    answers = []
    for i, prompt in enumerate(prompts):
        inputs = processor(images=Image.open(folder / "images" / f"{i}.png"), text=prompt, return_tensors="pt")
        out = model.generate(**inputs, **FAST)
        echoed = inputs["input_ids"] if model.config.use_decoder_only_language_model else None
        answers.append(processor.post_process_generation(out, echoed)[0])
    return answers


def hand_vqa_accuracy(matches: int, total: int = 10) -> float:
    """Leave-one-out min(#matches / 3, 1), written out by hand."""
    return sum(min((matches - (i < matches)) / 3, 1.0) for i in range(total)) / total


def count_images(model) -> tuple[list[int], object]:
    """Batch sizes seen by the vision encoder: it runs once per batch in both generation and ranking."""
    seen: list[int] = []
    handle = model.vision_model.register_forward_hook(lambda _m, args, _o: seen.append(args[0].shape[0]))
    return seen, handle


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --- the command line, end to end ---------------------------------------------------------------------------

def test_cli_end_to_end(llama, image_dir, tmp_path):
    model, processor = llama
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    prompts = [f"Question: {q} Short answer:" for q in QUESTIONS[:3]]
    want = reference_answers(model, processor, image_dir, prompts)
    assert all(want), want  # the answers are used as human answers below, which must not be empty
    # Human answers matching the model 3, 1 and 0 times: VQA accuracies 0.9, 0.3 and 0.
    answers = [[want[0]] * 3 + ["zz"] * 7, [want[1]] + ["zz"] * 9, ["zz"] * 10]
    data = write_jsonl(image_dir / "vizwiz.jsonl", [
        {"image": f"images/{i}.png", "question": q, "answers": a, **({"id": "q0"} if i == 0 else {})}
        for i, (q, a) in enumerate(zip(QUESTIONS, answers))
    ])
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "hf_instructblip.evaluate", "--model", str(model_dir), "--data", str(data),
           "--task", "vizwiz", "--output-dir", str(out), "--batch-size", "2", "--num-beams", "2",
           "--max-new-tokens", "3", "--device", "cpu"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr

    rows = read_rows(out / "vizwiz_predictions.jsonl")
    assert [r["id"] for r in rows] == ["q0", 2, 3]  # id from the record, else the line number
    assert [r["prompt"] for r in rows] == prompts
    assert [r["prediction"] for r in rows] == want  # batched, left padded == one by one
    metrics = json.loads((out / "vizwiz_metrics.json").read_text())
    recomputed = sum(hand_vqa_accuracy(sum(a == r["prediction"] for a in ans)) for r, ans in zip(rows, answers)) / 3
    assert recomputed == pytest.approx((0.9 + 0.3 + 0.0) / 3)
    assert metrics["score"] == pytest.approx(recomputed)
    assert (metrics["task"], metrics["metric"], metrics["num_examples"]) == ("vizwiz", "vqa_accuracy", 3)
    assert metrics["generation"]["num_beams"] == 2 and metrics["generation"]["length_penalty"] == -1.0
    assert json.loads(done.stdout) == metrics


def model_folder(tmp_path: Path) -> Path:
    """A folder that passes the CLI's `--model` check; loading it would fail, so a test passing with it shows that
    the CLI stopped before the model load."""
    folder = tmp_path / "model"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text("{}")
    return folder


def test_cli_reports_malformed_line_number(image_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "bad.jsonl", [
        {"image": "a.png", "question": "q", "answers": ["a"]}, "", '{"image": "b.png", "question": }',
    ])
    assert main(["--model", str(model_folder(tmp_path)), "--data", str(data), "--task", "vizwiz"]) == 2
    assert "bad.jsonl, line 3: malformed JSON" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"line 3: malformed JSON \(Expecting value, column 32\)"):
        load_records(data)
    write_jsonl(data, ['["image"]'])
    with pytest.raises(ValueError, match="line 1: expected a JSON object"):
        load_records(data)
    write_jsonl(data, [{"image": "a.png", "id": 7}, {"image": "b.png", "id": "7"}])
    with pytest.raises(ValueError, match="line 2: id '7' already used on line 1"):
        load_records(data)


@pytest.mark.parametrize("option", ["--batch-size", "--limit", "--candidate-batch-size", "--num-beams",
                                    "--max-new-tokens"])
def test_cli_refuses_numbers_below_one(option, tmp_path, capsys):
    argv = ["--model", str(model_folder(tmp_path)), "--data", "d.jsonl", "--task", "iconqa", option, "0"]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert f"argument {option}: `value` must be an int >= 1, found 0." in capsys.readouterr().err


def test_cli_checks_paths_records_and_predictions_before_loading_the_model(image_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "vizwiz.jsonl", [{"image": f"{image_dir}/images/0.png", "question": "q",
                                                    "answers": ["a"]}])
    model = str(model_folder(tmp_path))

    def error(**changes) -> str:
        argv = {"--model": model, "--data": str(data), "--task": "vizwiz", "--output-dir": str(tmp_path / "out"),
                **changes}
        assert main([item for pair in argv.items() for item in pair]) == 2
        return capsys.readouterr().err

    assert "`--model`: expected an existing model folder or a Hub id 'owner/name', found " \
           f"'{tmp_path}/missing/model', which is neither" in error(**{"--model": str(tmp_path / "missing" / "model")})
    (tmp_path / "empty").mkdir()
    assert "`--model`: expected a saved model folder (with config.json)" in \
        error(**{"--model": str(tmp_path / "empty")})
    # A plausible Hub id passes the check (offline, nothing is fetched): the run stops at the missing data file.
    assert "`--data`: expected an existing JSON-lines file, found 'nope.jsonl'" in \
        error(**{"--model": "Salesforce/instructblip-flan-t5-xl", "--data": "nope.jsonl"})
    (tmp_path / "out.txt").write_text("")
    assert f"`--output-dir`: expected a folder, found the file '{tmp_path / 'out.txt'}'" in \
        error(**{"--output-dir": str(tmp_path / "out.txt")})
    # Every example's fields, and the rows already in the predictions file.
    write_jsonl(data, [{"image": f"{image_dir}/images/0.png", "text": "q"}])
    assert "record 1 'answers': expected a non-empty list of non-empty strings, found None" in error()
    write_jsonl(data, [{"image": f"{image_dir}/images/0.png", "question": "q", "answers": ["a"]}])
    (tmp_path / "out").mkdir()
    write_jsonl(tmp_path / "out" / "vizwiz_predictions.jsonl", [{"id": 1, "task": "vizwiz", "prompt": "p"}])
    assert "vizwiz_predictions.jsonl, line 1: a 'generate' prediction row needs" in error()
    write_jsonl(tmp_path / "out" / "vizwiz_predictions.jsonl",
                [{"id": 1, "task": "vizwiz", "prompt": "Question: other Short answer:", "prediction": "a"}])
    assert "1 predictions were made for another prompt" in error()


# --- resume -------------------------------------------------------------------------------------------------

class Interrupt(Exception):
    pass


def iconqa_records(folder: Path) -> list[dict]:
    rows = [{"image": f"images/{i}.png", "question": q, "options": o, "answer": o[-1]}
            for i, (q, o) in enumerate(zip(QUESTIONS, OPTIONS))]
    return load_records(write_jsonl(folder / "iconqa.jsonl", rows))


def test_interrupted_run_resumes_without_redoing_or_losing(llama, image_dir, tmp_path):
    model, processor = llama
    records = iconqa_records(image_dir)
    predictions = tmp_path / "iconqa_predictions.jsonl"

    def stop_after_first(index, rows):
        if index == 1:
            raise Interrupt

    seen, handle = count_images(model)
    try:
        with pytest.raises(Interrupt):
            evaluate(model, processor, records, "iconqa", predictions_path=predictions, batch_size=2,
                     progress=False, on_batch=stop_after_first)
        assert seen == [2, 2]
        partial = predictions.read_text()
        assert [r["id"] for r in read_rows(predictions)] == [1, 2, 3, 4]  # both finished batches are on disk

        seen.clear()
        metrics = evaluate(model, processor, records, "iconqa", predictions_path=predictions, batch_size=2,
                           metrics_path=tmp_path / "metrics.json", progress=False)
        assert seen == [1]  # only the fifth example was computed
    finally:
        handle.remove()
    assert predictions.read_text().startswith(partial)  # earlier lines untouched
    rows = read_rows(predictions)
    assert [r["id"] for r in rows] == [1, 2, 3, 4, 5]

    # The same as one uninterrupted run.
    fresh = tmp_path / "fresh.jsonl"
    evaluate(model, processor, records, "iconqa", predictions_path=fresh, batch_size=2, progress=False)
    for resumed, whole in zip(rows, read_rows(fresh)):
        assert resumed["best"] == whole["best"]
        torch.testing.assert_close(torch.tensor(resumed["scores"]), torch.tensor(whole["scores"]))

    # Accuracy recomputed from the file: the best-scoring option vs the right one (the last option).
    for row, options in zip(rows, OPTIONS):
        assert row["candidates"] == options and len(row["scores"]) == len(options)
        assert row["best"] == max(range(len(options)), key=lambda j: (row["scores"][j], -j))
        assert row["prediction"] == options[row["best"]]
    accuracy = sum(row["best"] == len(o) - 1 for row, o in zip(rows, OPTIONS)) / len(rows)
    assert metrics["score"] == pytest.approx(accuracy)
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics


def test_limit_then_full_run(llama, image_dir, tmp_path):
    model, processor = llama
    records = iconqa_records(image_dir)
    predictions = tmp_path / "p.jsonl"
    first = evaluate(model, processor, records, "iconqa", predictions_path=predictions, limit=2, progress=False)
    assert first["num_examples"] == 2
    seen, handle = count_images(model)
    try:
        evaluate(model, processor, records, "iconqa", predictions_path=predictions, batch_size=8, progress=False)
    finally:
        handle.remove()
    assert seen == [3]
    assert [r["id"] for r in read_rows(predictions)] == [1, 2, 3, 4, 5]


def test_cut_off_last_line_is_recomputed(llama, image_dir, tmp_path):
    model, processor = llama
    records = iconqa_records(image_dir)
    predictions = tmp_path / "p.jsonl"
    evaluate(model, processor, records, "iconqa", predictions_path=predictions, limit=3, progress=False)
    lines = predictions.read_text().splitlines(keepends=True)
    predictions.write_text("".join(lines[:2]) + lines[2][: len(lines[2]) // 2])  # killed while writing line 3
    seen, handle = count_images(model)
    try:
        evaluate(model, processor, records, "iconqa", predictions_path=predictions, progress=False)
    finally:
        handle.remove()
    assert seen == [3]  # ids 3, 4, 5
    assert [r["id"] for r in read_rows(predictions)] == [1, 2, 3, 4, 5]


def gqa_row(i: int) -> str:
    return json.dumps({"id": i, "task": "gqa", "prompt": "p", "prediction": "a"})


def test_complete_row_without_its_newline_is_dropped_not_merged(tmp_path):
    """Killed between a row's `}` and its newline: the row is recomputed, the next append starts a fresh line."""
    path = tmp_path / "p.jsonl"
    path.write_text(f"{gqa_row(1)}\n{gqa_row(2)}")
    assert list(read_predictions(path, "gqa")) == ["1"]
    assert path.read_text() == f"{gqa_row(1)}\n"
    with path.open("a") as handle:  # what the runner appends next
        handle.write(f"{gqa_row(2)}\n{gqa_row(3)}\n")
    assert list(read_predictions(path, "gqa")) == ["1", "2", "3"]


def test_bad_predictions_file_is_reported(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [gqa_row(1), "{oops", gqa_row(3)])
    with pytest.raises(ValueError, match=r"p.jsonl, line 2: malformed JSON"):
        read_predictions(path, "gqa")
    write_jsonl(path, [gqa_row(1)])
    with pytest.raises(ValueError, match="line 1: a prediction for task 'gqa', not 'vizwiz'"):
        read_predictions(path, "vizwiz")


@pytest.mark.parametrize(
    ("task", "row", "match"),
    [
        ("gqa", {"id": 1, "task": "gqa", "prompt": "p"},
         r"p.jsonl, line 2: a 'generate' prediction row needs the fields \['id', 'prompt', 'prediction'\]; "
         r"missing \['prediction'\], found \['id', 'prompt', 'task'\]"),
        ("gqa", {"task": "gqa", "prompt": "p", "prediction": "a"}, r"line 2: .* missing \['id'\]"),
        ("iconqa", {"id": 1, "task": "iconqa", "prompt": "p", "prediction": "a", "candidates": ["a", "b"]},
         r"line 2: a 'rank' prediction row needs .* missing \['scores', 'best'\]"),
        ("iconqa", {"id": 1, "task": "iconqa", "prompt": "p", "prediction": "a", "candidates": ["a", "b"],
                    "scores": [0.5], "best": 0},
         r"line 2: expected 'scores' \(one number per candidate\) and 'best' \(a candidate index\) for \['a', 'b'\], "
         r"found scores \[0.5\], best 0"),
        ("iconqa", {"id": 1, "task": "iconqa", "prompt": "p", "prediction": "a", "candidates": ["a", "b"],
                    "scores": [0.5, 0.1], "best": 2}, r"line 2: expected 'scores' .* best 2"),
    ],
)
def test_prediction_rows_without_their_fields_are_named(tmp_path, task, row, match):
    """A row that lacks what its mode's metric reads fails when the file is read, naming file and line."""
    path = write_jsonl(tmp_path / "p.jsonl", ["", row])
    with pytest.raises(ValueError, match=match):
        read_predictions(path, task)


def test_resume_refuses_rows_made_for_other_data(llama, image_dir, tmp_path):
    """Same ids, another prompt or other candidates (the data file changed): the old rows are not reused silently."""
    model, processor = llama
    records = iconqa_records(image_dir)
    predictions = tmp_path / "p.jsonl"
    evaluate(model, processor, records, "iconqa", predictions_path=predictions, limit=3, progress=False)
    before = predictions.read_text()
    reworded = [{**r, "question": "a new question ?"} if r["id"] == 2 else r for r in records]
    with pytest.raises(ValueError, match=r"p.jsonl: 1 predictions were made for another prompt or other candidates "
                                         r"than the records now give \(ids \[2\]\); delete the file"):
        evaluate(model, processor, reworded, "iconqa", predictions_path=predictions, progress=False)
    new_options = [{**r, "options": [*r["options"], "maybe"]} if r["id"] in (1, 3) else r for r in records]
    with pytest.raises(ValueError, match=r"2 predictions .* \(ids \[1, 3\]\)"):
        evaluate(model, processor, new_options, "iconqa", predictions_path=predictions, progress=False)
    assert predictions.read_text() == before  # nothing appended
    # Changed records past the rows already written are fine: they are computed as usual.
    later = [{**r, "question": "a new question ?"} if r["id"] == 5 else r for r in records]
    metrics = evaluate(model, processor, later, "iconqa", predictions_path=predictions, progress=False)
    assert metrics["num_examples"] == 5


# --- the other metrics, recomputed from the predictions file -------------------------------------------------

def test_hateful_memes_auc_and_visdial_mrr(llama, image_dir, tmp_path):
    model, processor = llama
    labels = [1, 0, 1, 0, 0]
    memes = [{"image": f"{image_dir}/images/{i}.png", "text": q, "label": y}
             for i, (q, y) in enumerate(zip(QUESTIONS, labels))]
    auc = evaluate(model, processor, memes, "hateful_memes", predictions_path=tmp_path / "hm.jsonl",
                   batch_size=3, progress=False)
    rows = read_rows(tmp_path / "hm.jsonl")
    assert all(r["candidates"] == ["no", "yes"] for r in rows)
    assert rows[0]["prompt"] == f'This is an image with: "{QUESTIONS[0]}" written on it. Is it hateful? Answer:'
    margin = [r["scores"][1] - r["scores"][0] for r in rows]
    pairs = [(p, n) for p, yp in zip(margin, labels) if yp for n, yn in zip(margin, labels) if not yn]
    assert auc["score"] == pytest.approx(sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs) / len(pairs))

    dialogs = [{"image": f"{image_dir}/images/{i}.png", "question": q, "context": "hello", "candidates": o,
                "answer": o[0]} for i, (q, o) in enumerate(zip(QUESTIONS, OPTIONS))]
    mrr = evaluate(model, processor, dialogs, "visdial", predictions_path=tmp_path / "vd.jsonl",
                   reduction="mean", progress=False)
    rows = read_rows(tmp_path / "vd.jsonl")
    # The right answer is candidate 0; its rank counts every other candidate scoring at least as high.
    ranks = [1 + sum(s >= r["scores"][0] for s in r["scores"][1:]) for r in rows]
    assert mrr["score"] == pytest.approx(sum(1 / k for k in ranks) / len(ranks))
    assert mrr["reduction"] == "mean"


def test_t5_generation_and_exact_match(image_dir, tmp_path):
    model, processor = build("t5")
    prompts = [f"Question: {q} Short answer:" for q in QUESTIONS]
    want = reference_answers(model, processor, image_dir, prompts)
    answers = [want[0], "zz", want[2], "zz", "zz"]
    records = [{"image": str(image_dir / "images" / f"{i}.png"), "question": q, "answer": a}
               for i, (q, a) in enumerate(zip(QUESTIONS, answers))]
    metrics = evaluate(model, processor, records, "gqa", predictions_path=tmp_path / "gqa.jsonl", batch_size=5,
                       generation_kwargs={"num_beams": 2, "max_new_tokens": 3}, progress=False)
    rows = read_rows(tmp_path / "gqa.jsonl")
    assert [r["prediction"] for r in rows] == want  # batched (left padded) == one by one
    assert metrics["score"] == pytest.approx(sum(r["prediction"] == a for r, a in zip(rows, answers)) / 5)
    assert metrics["generation"] == {**FAST, "length_penalty": -1.0}


# --- tasks, prompts and bad input ----------------------------------------------------------------------------

def test_tasks_follow_the_paper_data():
    assert set(TASKS) == set(HELD_OUT)
    assert {t for t, spec in TASKS.items() if spec.mode == "rank"} == RANKING_DATASETS & set(HELD_OUT)
    assert {t: spec.metric for t, spec in TASKS.items()} == dict(HELD_OUT_METRICS)
    assert set(HELD_OUT_METRICS.values()) <= set(SCORERS)
    # The metrics as before the task table moved to the data file.
    assert {t: spec.metric for t, spec in TASKS.items()} == {
        "nocaps": "cider", "flickr30k": "cider", "gqa": "exact_match", "vsr": "exact_match",
        "vizwiz": "vqa_accuracy", "textvqa": "vqa_accuracy", "ivqa": "ivqa_accuracy", "iconqa": "accuracy",
        "scienceqa": "accuracy", "msvd_qa": "accuracy", "msrvtt_qa": "accuracy", "visdial": "mrr",
        "hateful_memes": "roc_auc"}
    generate = {t: spec.generation for t, spec in TASKS.items() if spec.mode == "generate"}
    assert generate["gqa"] == {"num_beams": 5, "max_new_tokens": 10, "min_new_tokens": 1, "length_penalty": -1.0,
                               "do_sample": False}
    assert generate["nocaps"] == generate["flickr30k"] == {
        "num_beams": 5, "max_new_tokens": 256, "min_new_tokens": 1, "repetition_penalty": 1.5,
        "length_penalty": 1.0, "do_sample": False}


def test_runner_prompts_are_eval_prompt(tmp_path):
    """The runner fills prompts with `templates.eval_prompt` (its own filler, with other rules, is gone)."""
    tiny.images(1)[0].save(tmp_path / "a.png")
    image = str(tmp_path / "a.png")
    science = prepare_examples("scienceqa", [{"image": image, "question": "Q?", "options": ["x", "y"], "answer": "y"}])
    assert science[0].prompt == "Question: Q? Options: x, y. Answer:"  # no "Context:  " without a context
    with pytest.raises(ValueError, match=r"record 7: example: the 'gqa' prompt is missing the field\(s\) "
                                         r"'question' \(or 'text'\)"):
        prepare_examples("gqa", [{"image": image, "answer": "a", "id": 7}])


def test_bad_input_is_named(llama, tmp_path):
    model, processor = llama
    run = dict(predictions_path=tmp_path / "p.jsonl", progress=False)
    good = [{"image": "a.png", "question": "q", "answers": ["a"]}]
    with pytest.raises(ValueError, match="`task` must be one of"):
        evaluate(model, processor, good, "vqav3", **run)
    with pytest.raises(ValueError, match="`batch_size`"):
        evaluate(model, processor, good, "vizwiz", batch_size=0, **run)
    with pytest.raises(ValueError, match="`reduction`"):
        evaluate(model, processor, good, "vizwiz", reduction="max", **run)
    with pytest.raises(ValueError, match="'answers'"):
        evaluate(model, processor, [{"image": "a.png", "question": "q"}], "vizwiz", **run)
    with pytest.raises(ValueError, match="one of the candidates"):
        evaluate(model, processor, [{"image": "a.png", "question": "q", "options": ["x", "y"], "answer": "z"}],
                 "iconqa", **run)
    with pytest.raises(ValueError, match="'label' of 0 or 1"):
        evaluate(model, processor, [{"image": "a.png", "text": "t", "label": 2}], "hateful_memes", **run)
    with pytest.raises(TypeError, match="`records` must be a list"):
        evaluate(model, processor, "data.jsonl", "vizwiz", **run)
    with pytest.raises(ValueError, match="image file 'a.png' does not exist"):
        evaluate(model, processor, good, "vizwiz", **run)
    tiny.images(1)[0].save(tmp_path / "a.png")
    with pytest.raises(ValueError, match="id 1 is used twice"):
        evaluate(model, processor, [{**good[0], "image": str(tmp_path / "a.png"), "id": 1}] * 2, "vizwiz", **run)
    assert not (tmp_path / "p.jsonl").exists()  # nothing ran
