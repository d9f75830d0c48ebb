"""Video question answering: MSVD-QA and MSRVTT-QA test (ranked over the answer vocabulary) and iVQA test.

Records: `video` (a folder of frames, relative to the output file; decode each video to frames first, see
`hf_instructblip.evaluate.video`), `question`, and `candidates` + `answer` (MSVD, MSRVTT: the answer list the paper
ranks, LAVIS's `train_ans2label.json`) or `answers` (iVQA: the 5 annotators' answers).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..tasks import id_key
from .common import Conversion, Paths, Skip, expect, field, load_csv, load_json, where


def _answer_list(path: str | os.PathLike | None, dataset: str) -> list[str]:
    """The ranked vocabulary: a JSON list of answers or LAVIS's {answer: label} (ordered by label)."""
    if path is None:
        raise ValueError(f"{dataset} ranks the answer vocabulary: pass --answer-list (LAVIS's train_ans2label.json "
                         "or a JSON list of answers).")
    data = load_json(path, "--answer-list")
    answers = sorted(data, key=data.get) if isinstance(data, dict) else data
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) and a for a in answers):
        raise ValueError(f"{path}: expected a JSON list of answers or an {{answer: label}} object, found "
                         f"{type(data).__name__}.")
    if len(set(answers)) != len(answers):
        raise ValueError(f"{path}: the answer list holds duplicates.")
    return answers


def _youtube_names(mapping: str | os.PathLike | None) -> dict[str, str]:
    """MSVD's `youtube_mapping.txt` ("<clip name> vid<N>" a line) -> {"vid<N>": clip name}."""
    if mapping is None:
        return {}
    names = {}
    for number, line in enumerate(Path(mapping).read_text("utf-8").splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2:
            raise ValueError(f"{mapping}: line {number}: expected '<clip name> vid<N>', found {line!r}.")
        names[parts[1]] = parts[0]
    return names


def _ranked_video_qa(dataset: str, prefix: str, annotations: str | os.PathLike, paths: Paths,
                     answer_list: str | os.PathLike | None, mapping: str | os.PathLike | None) -> Conversion:
    candidates = _answer_list(answer_list, dataset)
    known = set(candidates)
    names = _youtube_names(mapping)
    questions = expect(load_json(annotations), list, annotations, "the top level")

    def convert(index: int, q: Any) -> dict[str, Any]:
        qid = (q.get("question_id", q.get("id")) if isinstance(q, dict) else None)
        at = where(annotations, index, qid)
        field(q if isinstance(q, dict) else {}, "question", "str", at)  # a record must be an object with a question
        if qid is not None:
            id_key(qid, f"{at}: field 'question_id' / 'id'")
        if "video" in q:  # LAVIS's qa_test.json: the video file name
            folders = [Path(field(q, "video", "str", at)).stem]
        else:  # the original release: an integer id
            video = f"{prefix}{field(q, 'video_id', 'int', at)}"
            folders = [names[video], video] if video in names else [video]
        answer = field(q, "answer", "str", at)
        if answer not in known:
            raise Skip("answer not in the answer list")
        return {"id": qid if qid is not None else index + 1, "video": paths.frames(folders, at),
                "question": field(q, "question", "str", at), "candidates": candidates, "answer": answer}

    return Conversion(questions, convert)


def msvd_qa(annotations: str | os.PathLike, paths: Paths, *, answer_list: str | os.PathLike | None = None,
            mapping: str | os.PathLike | None = None, **_: Any) -> Conversion:
    """MSVD-QA `test_qa.json` ([{"question", "answer", "id", "video_id"}]) or LAVIS's `qa_test.json` ([{"question",
    "answer", "question_id", "video"}]); frame folders `vid<video_id>`, the clip name from `mapping`
    (`youtube_mapping.txt`), or the stem of `video`.

    Example:
        >>> msvd_qa("test_qa.json", Paths("msvd/frames", "msvd.jsonl"), answer_list="train_ans2label.json")
    """
    return _ranked_video_qa("msvd_qa", "vid", annotations, paths, answer_list, mapping)


def msrvtt_qa(annotations: str | os.PathLike, paths: Paths, *, answer_list: str | os.PathLike | None = None,
              **_: Any) -> Conversion:
    """MSRVTT-QA `test_qa.json` ([{"question", "answer", "id", "video_id", "category_id"}]) or LAVIS's
    `qa_test.json`; frame folders `video<video_id>` (or the stem of `video`).

    Example:
        >>> msrvtt_qa("test_qa.json", Paths("msrvtt/frames", "msrvtt.jsonl"), answer_list="train_ans2label.json")
    """
    return _ranked_video_qa("msrvtt_qa", "video", annotations, paths, answer_list, None)


IVQA_COLUMNS = ("video_id", "start", "end", "question", "answer1", "answer2", "answer3", "answer4", "answer5")


def ivqa(annotations: str | os.PathLike, paths: Paths, **_: Any) -> Conversion:
    """iVQA `test.csv` (columns video_id, start, end, question, answer1..answer5); frame folders
    `<video_id>_<start>_<end>` (the clip's file name) or `<video_id>`. Empty answer cells are dropped.

    Example:
        >>> ivqa("test.csv", Paths("ivqa/frames", "ivqa.jsonl")).items[0]["video_id"]
    """
    rows = load_csv(annotations, IVQA_COLUMNS)

    def convert(index: int, row: dict[str, str]) -> dict[str, Any]:
        at = f"{annotations}: row {index + 1}"
        values = {c: (row.get(c) or "").strip() for c in IVQA_COLUMNS}
        for column in ("video_id", "question"):
            if not values[column]:
                raise ValueError(f"{at}: column {column!r} is empty.")
        answers = [values[f"answer{i}"] for i in range(1, 6) if values[f"answer{i}"]]
        if not answers:
            raise ValueError(f"{at}: columns 'answer1'..'answer5' are all empty.")
        clip = f"{values['video_id']}_{values['start']}_{values['end']}"
        return {"id": index + 1, "video": paths.frames([clip, values["video_id"]], at), "question": values["question"],
                "answers": answers}

    return Conversion(rows, convert)
