"""Open-ended question answering: GQA test-dev balanced, TextVQA val (with Rosetta OCR tokens), VizWiz val.

Records: `image`, `question`, and `answer` (GQA, exact match) or `answers` (TextVQA, VizWiz: the 10 human answers
for VQA accuracy); TextVQA adds `ocr_tokens`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .common import Conversion, Paths, Skip, expect, field, load_json, where


def gqa(annotations: str | os.PathLike, paths: Paths, **_: Any) -> Conversion:
    """`testdev_balanced_questions.json`: {question id: {"imageId", "question", "answer", ...}}; images
    `<imageId>.jpg`.

    Example:
        >>> len(gqa("testdev_balanced_questions.json", Paths("gqa/images", "gqa.jsonl")).items)
        12578
    """
    questions = expect(load_json(annotations), dict, annotations, "the top level (question id -> question)")

    def convert(index: int, item: tuple[str, Any]) -> dict[str, Any]:
        qid, q = item
        at = where(annotations, index, qid)
        image_id = field(q, "imageId", "str", at)
        return {"id": qid, "image": paths.image(f"{image_id}.jpg", at), "question": field(q, "question", "str", at),
                "answer": field(q, "answer", "str", at)}

    return Conversion(list(questions.items()), convert)


def _rosetta_tokens(ocr: str | os.PathLike) -> dict[str, list[str]]:
    """`TextVQA_Rosetta_OCR_v0.2_val.json`: {"data": [{"image_id", "ocr_tokens", ...}]} -> image id -> tokens."""
    data = expect(load_json(ocr, "--ocr"), dict, ocr, "the top level")
    tokens = {}
    for index, entry in enumerate(expect(data.get("data"), list, ocr, "'data'")):
        at = where(ocr, index, entry.get("image_id") if isinstance(entry, dict) else None)
        words = field(entry, "ocr_tokens", "list", at)
        if not all(isinstance(w, str) for w in words):
            raise ValueError(f"{at}: field 'ocr_tokens' must be a list of strings, found {words!r}.")
        tokens[field(entry, "image_id", "str", at)] = words
    return tokens


def textvqa(annotations: str | os.PathLike, paths: Paths, *, ocr: str | os.PathLike | None = None,
            **_: Any) -> Conversion:
    """`TextVQA_0.5.1_val.json`: {"data": [{"question_id", "image_id", "question", "answers", ...}]}, OCR tokens from
    `ocr` (Rosetta, `TextVQA_Rosetta_OCR_v0.2_val.json`) or, without it, from each question's own `ocr_tokens`;
    images `<image_id>.jpg` (the `train_images` folder holds val too). Questions whose image has no OCR token are
    skipped: the paper's prompt has no form without tokens.

    Example:
        >>> textvqa("TextVQA_0.5.1_val.json", Paths("train_images", "t.jsonl"), ocr="TextVQA_Rosetta_OCR_v0.2_val.json")
    """
    data = expect(load_json(annotations), dict, annotations, "the top level")
    questions = expect(data.get("data"), list, annotations, "'data'")
    tokens = _rosetta_tokens(ocr) if ocr is not None else None

    def convert(index: int, q: Any) -> dict[str, Any]:
        at = where(annotations, index, q.get("question_id") if isinstance(q, dict) else None)
        image_id = field(q, "image_id", "str", at)
        if tokens is None:
            words = field(q, "ocr_tokens", "list", f"{at} (no --ocr file given)")
        elif image_id in tokens:
            words = tokens[image_id]
        else:
            raise ValueError(f"{at}: field 'image_id': {image_id!r} has no entry in --ocr {str(ocr)!r}.")
        if not all(isinstance(w, str) for w in words):
            raise ValueError(f"{at}: field 'ocr_tokens' must be a list of strings, found {words!r}.")
        words = [w for w in words if w.strip()]
        if not words:
            raise Skip("no OCR token for the image")
        return {"id": field(q, "question_id", "int", at), "image": paths.image(f"{image_id}.jpg", at),
                "question": field(q, "question", "str", at), "ocr_tokens": words,
                "answers": field(q, "answers", "strs", at)}

    return Conversion(questions, convert)


def vizwiz(annotations: str | os.PathLike, paths: Paths, **_: Any) -> Conversion:
    """VizWiz-VQA `val.json`: [{"image", "question", "answers": [{"answer", "answer_confidence"}], "answerable",
    ...}] -> one record per image (one question each) with its 10 answers. The test split ships no answers (it
    is scored on the EvalAI server) and is refused.

    Example:
        >>> vizwiz("val.json", Paths("vizwiz/val", "vizwiz.jsonl")).items[0]["image"]
        'VizWiz_val_00000000.jpg'
    """
    questions = expect(load_json(annotations), list, annotations, "the top level")

    def convert(index: int, q: Any) -> dict[str, Any]:
        at = where(annotations, index, q.get("image") if isinstance(q, dict) else None)
        image = field(q, "image", "str", at)
        if "answers" not in q:
            raise ValueError(f"{at}: field 'answers' is missing: the VizWiz test split has no public answers; "
                             "convert val.json, or submit test predictions to the VizWiz server.")
        answers = [field(a, "answer", "str", f"{at} answers[{i}]")
                   for i, a in enumerate(field(q, "answers", "list", at))]
        if not answers:
            raise ValueError(f"{at}: field 'answers' is empty.")
        return {"id": Path(image).stem, "image": paths.image(image, at), "question": field(q, "question", "str", at),
                "answers": answers}

    return Conversion(questions, convert)
