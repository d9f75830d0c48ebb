"""Converters from the held-out datasets' official files: small samples written in each official format (field names,
nesting and id conventions of the published schema), converted, loaded back with `tasks.load_records` and made ready
with `tasks.prepare_examples`; one malformed sample each, whose error names the file, the record and the field. Also
the CLI (--list, summary) and the paper's Table 1 numbers."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from hf_instructblip.evaluate.paper import PAPER_LLMS, PAPER_ZERO_SHOT, paper_zero_shot, to_paper_scale
from hf_instructblip.evaluate.prepare import CONVERTERS, SOURCES, describe_sources, main, prepare_dataset
from hf_instructblip.evaluate.tasks import load_records, prepare_examples
from hf_instructblip.templates import HELD_OUT


def image(path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (200, 30, 30)).save(path)
    return path.name


def frames(folder: Path, count: int = 3) -> None:
    for i in range(1, count + 1):
        image(folder / f"{i:05d}.jpg")


def dump(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


def lines(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


# Each builder writes an official-format sample under `root` and returns (prepare kwargs, mutation that breaks one
# field of it, regex its error must match: file, record, field).
Built = tuple[dict, Callable[[], None], str]


def nocaps(root: Path) -> Built:
    image(root / "val" / "0013ea2087020901.jpg")
    data = {"info": {}, "licenses": [], "images": [
        {"id": 0, "open_images_id": "0013ea2087020901", "file_name": "0013ea2087020901.jpg", "domain": "in-domain",
         "height": 8, "width": 8, "coco_url": "https://example.org/x.jpg", "license": 0}],
        "annotations": [{"image_id": 0, "id": i, "caption": f"a red square number {i}"} for i in range(10)]}
    ann = dump(root / "nocaps_val_4500_captions.json", data)

    def bad():
        data["annotations"][3]["caption"] = ""
        dump(ann, data)
    return dict(annotations=ann, images=root / "val"), bad, \
        r"nocaps_val_4500_captions\.json: annotations\[3\].*'caption'"


def flickr30k(root: Path) -> Built:
    image(root / "flickr30k-images" / "1007129816.jpg")
    image(root / "flickr30k-images" / "1009434119.jpg")
    data = {"dataset": "flickr30k", "images": [
        {"filename": "1009434119.jpg", "imgid": 0, "split": "train", "sentids": [0], "sentences": [
            {"raw": "A dog runs.", "tokens": ["a", "dog", "runs"], "imgid": 0, "sentid": 0}]},
        {"filename": "1007129816.jpg", "imgid": 1, "split": "test", "sentids": [5, 6], "sentences": [
            {"raw": "The man with pierced ears.", "tokens": ["the"], "imgid": 1, "sentid": 5},
            {"raw": "A man in an orange hat.", "tokens": ["a"], "imgid": 1, "sentid": 6}]}]}
    ann = dump(root / "dataset_flickr30k.json", data)

    def bad():
        del data["images"][1]["sentences"][1]["raw"]
        dump(ann, data)
    return dict(annotations=ann, images=root / "flickr30k-images"), bad, \
        r"dataset_flickr30k\.json: record 1 \(id 1\) sentences\[1\]: field 'raw' is missing"


def gqa(root: Path) -> Built:
    image(root / "images" / "n161313.jpg")
    data = {"201307251": {"semantic": [], "entailed": [], "equivalent": ["201307251"], "question": "Is it red?",
                          "imageId": "n161313", "isBalanced": True, "groups": {"global": None, "local": "10c-red"},
                          "answer": "yes", "semanticStr": "", "annotations": {}, "types": {}, "fullAnswer": "Yes."}}
    ann = dump(root / "testdev_balanced_questions.json", data)

    def bad():
        data["201307251"]["imageId"] = 161313
        dump(ann, data)
    return dict(annotations=ann, images=root / "images"), bad, \
        r"testdev_balanced_questions\.json: record 0 \(id '201307251'\): field 'imageId'"


def vsr(root: Path) -> Built:
    image(root / "images" / "000000085637.jpg")
    rows = [{"image": "000000085637.jpg", "image_link": "http://images.cocodataset.org/train2017/000000085637.jpg",
             "caption": "The umbrella is under the bed.", "label": 0, "relation": "under", "subj": "umbrella",
             "obj": "bed", "annotator_id": 0, "vote_true_validator_id": [], "vote_false_validator_id": [2]}]
    ann = lines(root / "test.jsonl", rows)

    def bad():
        rows[0]["label"] = "false"
        lines(ann, rows)
    return dict(annotations=ann, images=root / "images"), bad, r"test\.jsonl: line 1: field 'label'"


def iconqa(root: Path) -> Built:
    image(root / "iconqa" / "test" / "choose_txt" / "12" / "image.png")
    data = {"12": {"question": "How many dots?", "choices": ["3", "4"], "answer": 1, "ques_type": "choose_txt",
                   "grade": "prek", "label": "", "split": "test"},
            "13": {"question": "Which?", "choices": [], "answer": 0, "ques_type": "choose_img", "split": "test"},
            "14": {"question": "How many?", "answer": "5", "ques_type": "fill_in_blank", "split": "test"}}
    ann = dump(root / "problems.json", data)

    def bad():
        data["12"]["answer"] = 2
        dump(ann, data)
    return dict(annotations=ann, images=root / "iconqa"), bad, r"problems\.json: record 0 \(id '12'\): field 'answer'"


def textvqa(root: Path) -> Built:
    image(root / "train_images" / "003a8ae2ef43b901.jpg")
    data = {"dataset_type": "val", "dataset_name": "textvqa", "dataset_version": "0.5.1", "data": [
        {"question": "what is the brand?", "image_id": "003a8ae2ef43b901", "image_classes": ["Bottle"],
         "flickr_original_url": "", "flickr_300k_url": "", "image_width": 8, "image_height": 8,
         "answers": ["nokia"] * 9 + ["toshiba"], "question_tokens": ["what"], "question_id": 34602, "set_name": "val"},
        {"question": "what does it say?", "image_id": "003a8ae2ef43b901", "answers": ["none"] * 10,
         "question_id": 34603, "set_name": "val"}]}
    ocr = {"dataset_type": "val", "dataset_name": "textvqa", "dataset_version": "0.2", "data": [
        {"image_id": "003a8ae2ef43b901", "ocr_tokens": ["NOKIA", "5800"], "ocr_info": [], "set_name": "val"}]}
    ann = dump(root / "TextVQA_0.5.1_val.json", data)
    dump(root / "TextVQA_Rosetta_OCR_v0.2_val.json", ocr)

    def bad():
        data["data"][1]["answers"] = "none"
        dump(ann, data)
    return dict(annotations=ann, images=root / "train_images", ocr=root / "TextVQA_Rosetta_OCR_v0.2_val.json"), bad, \
        r"TextVQA_0\.5\.1_val\.json: record 1 \(id 34603\): field 'answers'"


def visdial(root: Path) -> Built:
    image(root / "VisualDialog_val2018" / "VisualDialog_val2018_000000000185.jpg")
    answers = [f"answer {i}" for i in range(110)]
    questions = ["is it red", "is it big", "what shape"]
    rounds = [{"question": q, "answer": 100 + q, "answer_options": list(range(99)) + [100 + q], "gt_index": 99}
              for q in range(3)]
    data = {"version": "1.0", "split": "val2018", "data": {"questions": questions, "answers": answers, "dialogs": [
        {"image_id": 185, "caption": "a red square on a table", "dialog": rounds}]}}
    ann = dump(root / "visdial_1.0_val.json", data)

    def bad():
        data["data"]["dialogs"][0]["dialog"][2]["answer_options"] = list(range(50))
        dump(ann, data)
    return dict(annotations=ann, images=root / "VisualDialog_val2018"), bad, \
        r"visdial_1\.0_val\.json: record 0 \(id 185\) round 3: field 'answer_options'"


def hateful_memes(root: Path) -> Built:
    image(root / "hm" / "img" / "08291.png")
    rows = [{"id": 8291, "img": "img/08291.png", "label": 1, "text": "white people is this a shooting range"}]
    ann = lines(root / "dev_seen.jsonl", rows)

    def bad():
        del rows[0]["text"]
        lines(ann, rows)
    return dict(annotations=ann, images=root / "hm"), bad, r"dev_seen\.jsonl: line 1 \(id 8291\): field 'text'"


def vizwiz(root: Path) -> Built:
    image(root / "val" / "VizWiz_val_00000000.jpg")
    data = [{"image": "VizWiz_val_00000000.jpg", "question": "Ok. There is another picture?", "answerable": 1,
             "answer_type": "other", "answers": [{"answer": "sodastream", "answer_confidence": "yes"}] * 7
             + [{"answer": "unanswerable", "answer_confidence": "maybe"}] * 3}]
    ann = dump(root / "val.json", data)

    def bad():
        del data[0]["answers"]
        dump(ann, data)
    return dict(annotations=ann, images=root / "val"), bad, \
        r"val\.json: record 0 \(id 'VizWiz_val_00000000.jpg'\): field 'answers' is missing"


def scienceqa(root: Path) -> Built:
    image(root / "images" / "test" / "5" / "image.png")
    data = {"5": {"question": "Which is a mammal?", "choices": ["frog", "cat"], "answer": 1, "hint": "Look closely.",
                  "image": "image.png", "task": "closed choice", "grade": "grade2", "subject": "natural science",
                  "topic": "biology", "category": "", "skill": "", "lecture": "", "solution": "", "split": "test"},
            "6": {"question": "Which is a bird?", "choices": ["owl", "cat"], "answer": 0, "hint": "", "image": None,
                  "split": "test"},
            "7": {"question": "Which?", "choices": ["a", "b"], "answer": 0, "hint": "", "image": "image.png",
                  "split": "train"}}
    ann = dump(root / "problems.json", data)

    def bad():
        data["5"]["choices"] = "frog, cat"
        dump(ann, data)
    return dict(annotations=ann, images=root / "images"), bad, r"problems\.json: record 0 \(id '5'\): field 'choices'"


def msvd_qa(root: Path) -> Built:
    frames(root / "frames" / "-4wsuPCjDBc_5_15")
    data = [{"answer": "dance", "id": 30933, "question": "what is the girl doing?", "video_id": 1},
            {"answer": "somersault", "id": 30934, "question": "what does the man do?", "video_id": 1}]
    ann = dump(root / "test_qa.json", data)
    dump(root / "train_ans2label.json", {"play": 0, "dance": 1, "run": 2})
    (root / "youtube_mapping.txt").write_text("-4wsuPCjDBc_5_15 vid1\n")

    def bad():
        data[0]["video_id"] = "vid1"
        dump(ann, data)
    return dict(annotations=ann, images=root / "frames", answer_list=root / "train_ans2label.json",
                mapping=root / "youtube_mapping.txt"), bad, r"test_qa\.json: record 0 \(id 30933\): field 'video_id'"


def msrvtt_qa(root: Path) -> Built:
    frames(root / "frames" / "video7010")
    data = [{"question": "what is a man doing?", "answer": "talk", "question_id": 0, "video": "video7010.mp4"}]
    ann = dump(root / "qa_test.json", data)
    dump(root / "answers.json", ["talk", "sing", "cook"])

    def bad():
        data[0]["video"] = "video9999.mp4"
        dump(ann, data)
    return dict(annotations=ann, images=root / "frames", answer_list=root / "answers.json"), bad, \
        r"qa_test\.json: record 0 \(id 0\): no frame folder 'video9999'"


def ivqa(root: Path) -> Built:
    frames(root / "frames" / "aPFlwnNX-8w_19_29")
    csv = root / "test.csv"
    csv.write_text("video_id,start,end,question,answer1,answer2,answer3,answer4,answer5\n"
                   "aPFlwnNX-8w,19,29,what is the man cooking?,pasta,pasta,noodles,pasta,spaghetti\n")

    def bad():
        csv.write_text("video_id,start,end,question,answer1\naPFlwnNX-8w,19,29,what?,pasta\n")
    return dict(annotations=csv, images=root / "frames"), bad, r"test\.csv: the header lacks the column\(s\)"


BUILDERS = {f.__name__: f for f in (nocaps, flickr30k, gqa, vsr, iconqa, textvqa, visdial, hateful_memes, vizwiz,
                                    scienceqa, msvd_qa, msrvtt_qa, ivqa)}

# What the runner must see for the first record of each sample: a part of its prompt and its reference.
EXPECTED = {
    "nocaps": ("A short image description:", [f"a red square number {i}" for i in range(10)]),
    "flickr30k": ("A short image description:", ["The man with pierced ears.", "A man in an orange hat."]),
    "gqa": ("Question: Is it red? Short answer:", "yes"),
    "vsr": ('"The umbrella is under the bed." Answer:', "false"),
    "iconqa": ("Question: How many dots? Options: 3, 4. Short answer:", 1),
    "textvqa": ("OCR tokens: NOKIA, 5800. Question: what is the brand? Short answer:", ["nokia"] * 9 + ["toshiba"]),
    "visdial": ("Dialog history: a red square on a table\n Question: is it red Short answer:", 99),
    "hateful_memes": ('"white people is this a shooting range" written on it', 1),
    "vizwiz": ("Question: Ok. There is another picture? Short answer:", ["sodastream"] * 7 + ["unanswerable"] * 3),
    "scienceqa": ("Context: Look closely. Question: Which is a mammal? Options: frog, cat. Answer:", 1),
    "msvd_qa": ("Question: what is the girl doing? Short answer:", 1),
    "msrvtt_qa": ("Question: what is a man doing? Short answer:", 0),
    "ivqa": ("Question: what is the man cooking? Short answer:", ["pasta", "pasta", "noodles", "pasta", "spaghetti"]),
}
COUNTS = {"flickr30k": (1, {"split 'train', not 'test'": 1}), "iconqa": (1, {"not a test choose_txt question": 2}),
          "textvqa": (2, {}), "visdial": (3, {}), "scienceqa": (1, {"no image context": 1, "not a test question": 1}),
          "msvd_qa": (1, {"answer not in the answer list": 1})}


def test_one_converter_per_held_out_task():
    assert set(BUILDERS) == set(CONVERTERS) == set(SOURCES) == set(HELD_OUT)
    assert all(SOURCES[name].annotations and SOURCES[name].source.startswith("https://") for name in HELD_OUT)


@pytest.mark.parametrize("dataset", sorted(BUILDERS))
def test_official_sample_converts_to_runner_records(tmp_path, dataset):
    kwargs, _, _ = BUILDERS[dataset](tmp_path / "official")
    output = tmp_path / "prepared" / f"{dataset}.jsonl"  # elsewhere than the images: paths must be relative to it
    summary = prepare_dataset(dataset, output=output, progress=False, **kwargs)
    written, skipped = COUNTS.get(dataset, (1, {}))
    assert (summary.written, dict(summary.skipped)) == (written, skipped)
    raw = [json.loads(line) for line in output.read_text().splitlines()]
    visual = "video" if dataset in ("msvd_qa", "msrvtt_qa", "ivqa") else "image"
    assert all(not Path(r[visual]).is_absolute() for r in raw)
    examples = prepare_examples(dataset, load_records(output))
    prompt_part, reference = EXPECTED[dataset]
    assert prompt_part in examples[0].prompt
    assert examples[0].reference == reference
    if visual == "video":
        assert [Path(f).name for f in examples[0].video] == ["00001.jpg", "00002.jpg", "00003.jpg"]
    else:
        assert Path(examples[0].image).is_file()


def test_textvqa_without_ocr_tokens_is_left_out(tmp_path):
    kwargs, _, _ = textvqa(tmp_path)
    dump(kwargs["ocr"], {"data": [{"image_id": "003a8ae2ef43b901", "ocr_tokens": []}]})
    with pytest.raises(ValueError, match=r"no textvqa record to write \(left out: \{'no OCR token for the image': 2"):
        prepare_dataset("textvqa", output=tmp_path / "t.jsonl", progress=False, **kwargs)


def test_visdial_history_grows_round_by_round(tmp_path):
    kwargs, _, _ = visdial(tmp_path)
    prepare_dataset("visdial", output=tmp_path / "v.jsonl", progress=False, **kwargs)
    records = load_records(tmp_path / "v.jsonl")
    assert [r["id"] for r in records] == ["185_1", "185_2", "185_3"]
    assert records[2]["context"] == "a red square on a table q: is it red a: answer 100 q: is it big a: answer 101"
    assert len(records[2]["candidates"]) == 100 and records[2]["candidates"][99] == "answer 102"


@pytest.mark.parametrize("dataset", sorted(BUILDERS))
def test_malformed_sample_names_file_record_and_field(tmp_path, dataset):
    kwargs, break_it, message = BUILDERS[dataset](tmp_path)
    break_it()
    output = tmp_path / "out.jsonl"
    with pytest.raises(ValueError, match=message):
        prepare_dataset(dataset, output=output, progress=False, **kwargs)
    assert not output.exists()  # nothing half-written


def test_missing_images_and_files_are_named(tmp_path):
    kwargs, _, _ = gqa(tmp_path)
    (tmp_path / "images" / "n161313.jpg").unlink()
    with pytest.raises(ValueError, match=r"record 0 \(id '201307251'\): image file .*n161313\.jpg' does not exist"):
        prepare_dataset("gqa", output=tmp_path / "g.jsonl", progress=False, **kwargs)
    with pytest.raises(ValueError, match=r"--annotations: .*nope\.json' is not a file"):
        prepare_dataset("gqa", tmp_path / "nope.json", tmp_path, tmp_path / "g.jsonl")
    (tmp_path / "broken.json").write_text('{"1": {')
    with pytest.raises(ValueError, match=r"broken\.json: malformed JSON .*line 1"):
        prepare_dataset("gqa", tmp_path / "broken.json", tmp_path, tmp_path / "g.jsonl")
    with pytest.raises(ValueError, match=r"pass --answer-list"):
        prepare_dataset("msrvtt_qa", tmp_path / "broken.json", tmp_path, tmp_path / "m.jsonl")
    with pytest.raises(ValueError, match=r"`dataset` must be one of"):
        prepare_dataset("coco", tmp_path / "broken.json", tmp_path, tmp_path / "m.jsonl")


def test_cli_list_and_summary(tmp_path, capsys):
    assert main(["--list"]) == 0
    listed = capsys.readouterr().out
    assert listed == describe_sources() + "\n"
    assert all(re.search(rf"^{name}: ", listed, re.M) for name in HELD_OUT)
    assert "--answer-list train_ans2label.json" in listed
    kwargs, break_it, _ = scienceqa(tmp_path)
    args = ["--dataset", "scienceqa", "--annotations", str(kwargs["annotations"]), "--images", str(kwargs["images"]),
            "--output", str(tmp_path / "sqa.jsonl")]
    assert main(args) == 0
    assert capsys.readouterr().out.strip() == (f"scienceqa: wrote 1 records to {tmp_path / 'sqa.jsonl'} "
                                               "(left out: 1 no image context, 1 not a test question)")
    break_it()
    assert main(args) == 2
    assert "field 'choices'" in capsys.readouterr().err


def test_cli_module_runs(tmp_path):
    kwargs, _, _ = hateful_memes(tmp_path)
    out = subprocess.run([sys.executable, "-m", "hf_instructblip.evaluate.prepare", "--dataset", "hateful_memes",
                          "--annotations", str(kwargs["annotations"]), "--images", str(kwargs["images"]),
                          "--output", str(tmp_path / "hm.jsonl")], capture_output=True, text=True, check=True)
    assert "hateful_memes: wrote 1 records" in out.stdout
    assert "converting hateful_memes" in out.stderr  # the progress bar


def test_paper_numbers():
    assert set(PAPER_ZERO_SHOT) == set(HELD_OUT)
    assert PAPER_LLMS == ("flan-t5-xl", "flan-t5-xxl", "vicuna-7b", "vicuna-13b")
    assert paper_zero_shot("nocaps", "vicuna-7b") == 123.1
    assert paper_zero_shot("scienceqa", "flan-t5-xxl") == 70.6
    assert all(set(entry["scores"]) == set(PAPER_LLMS) and entry["split"] and entry["metric"]
               for entry in PAPER_ZERO_SHOT.values())
    assert to_paper_scale(0.484) == pytest.approx(48.4)
    with pytest.raises(ValueError, match="`llm` must be one of"):
        paper_zero_shot("gqa", "opt-2.7b")
    with pytest.raises(ValueError, match="`task` must be one of"):
        paper_zero_shot("vqav2", "vicuna-7b")


def test_textvqa_inline_ocr_tokens_must_be_strings_and_cli_names_type_errors(tmp_path, capsys):
    """Without --ocr the questions' own `ocr_tokens` are read: a non-string token is named (was an AttributeError
    traceback), and the CLI reports TypeErrors of bad records as one line, exit status 2."""
    kwargs, _, _ = textvqa(tmp_path)
    data = json.loads(Path(kwargs["annotations"]).read_text())
    data["data"][0]["ocr_tokens"] = ["NOKIA", 5800]
    dump(Path(kwargs["annotations"]), data)
    with pytest.raises(ValueError, match=r"record 0 \(id 34602\): field 'ocr_tokens' must be a list of strings"):
        prepare_dataset("textvqa", kwargs["annotations"], kwargs["images"], tmp_path / "out.jsonl", progress=False)
    kwargs, _, _ = msvd_qa(tmp_path / "msvd")
    questions = json.loads(Path(kwargs["annotations"]).read_text())
    first = questions[0] if isinstance(questions, list) else next(iter(questions.values()))
    first["id" if "id" in first else next(iter(first))] = 1.5  # a float id (or first field) in an official file
    dump(Path(kwargs["annotations"]), questions)
    argv = ["--dataset", "msvd_qa", "--output", str(tmp_path / "msvd.jsonl"),
            *[arg for key, value in kwargs.items() for arg in (f"--{key.replace('_', '-')}", str(value))]]
    assert main(argv) == 2
    assert re.search(r"\nerror: .*test_qa\.json: record 0 .*must be a str or an int, found float 1\.5",
                     capsys.readouterr().err)
