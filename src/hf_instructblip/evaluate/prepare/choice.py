"""Multiple choice, scored by ranking the choices: IconQA multi-text-choice test and ScienceQA image test.

Records: `image`, `question`, `options` (the choices, in order), `answer` (the right choice's index); ScienceQA adds
`context` (the question's hint, left out of the prompt when empty).
"""

from __future__ import annotations

import os
from typing import Any

from .common import Conversion, Paths, Skip, expect, field, load_json, where


def _choice(q: Any, at: str) -> tuple[list[str], int]:
    choices = field(q, "choices", "strs", at)
    answer = field(q, "answer", "int", at)
    if not 0 <= answer < len(choices):
        raise ValueError(f"{at}: field 'answer' must index 'choices' (0..{len(choices) - 1}), found {answer}.")
    return choices, answer


def iconqa(annotations: str | os.PathLike, paths: Paths, **_: Any) -> Conversion:
    """IconQA `problems.json`: {pid: {"question", "choices", "answer" (index), "ques_type", "split", ...}} -> the
    test questions of type "choose_txt"; images `test/choose_txt/<pid>/image.png` under --images (the release's
    `iconqa_data/iconqa` folder).

    Example:
        >>> len(iconqa("problems.json", Paths("iconqa_data/iconqa", "iconqa.jsonl")).items)
        107439
    """
    problems = expect(load_json(annotations), dict, annotations, "the top level (pid -> problem)")

    def convert(index: int, item: tuple[str, Any]) -> dict[str, Any]:
        pid, q = item
        at = where(annotations, index, pid)
        if field(q, "split", "str", at) != "test" or field(q, "ques_type", "str", at) != "choose_txt":
            raise Skip("not a test choose_txt question")
        choices, answer = _choice(q, at)
        return {"id": pid, "image": paths.image(f"test/choose_txt/{pid}/image.png", at),
                "question": field(q, "question", "str", at), "options": choices, "answer": answer}

    return Conversion(list(problems.items()), convert)


def scienceqa(annotations: str | os.PathLike, paths: Paths, **_: Any) -> Conversion:
    """ScienceQA `problems.json`: {pid: {"question", "choices", "answer" (index), "hint", "image" (file name or
    null), "split", ...}} -> the test questions with an image (2,017); images `test/<pid>/<image>` under --images.

    Example:
        >>> scienceqa("problems.json", Paths("scienceqa/images", "sqa.jsonl")).items[0][0]
        '1'
    """
    problems = expect(load_json(annotations), dict, annotations, "the top level (pid -> problem)")

    def convert(index: int, item: tuple[str, Any]) -> dict[str, Any]:
        pid, q = item
        at = where(annotations, index, pid)
        if field(q, "split", "str", at) != "test":
            raise Skip("not a test question")
        if q.get("image") is None:
            raise Skip("no image context")
        image = field(q, "image", "str", at)
        choices, answer = _choice(q, at)
        hint = q.get("hint")
        if hint is not None and not isinstance(hint, str):
            raise ValueError(f"{at}: field 'hint' must be a string, found {hint!r}.")
        record = {"id": pid, "image": paths.image(f"test/{pid}/{image}", at),
                  "question": field(q, "question", "str", at), "options": choices, "answer": answer}
        if hint and hint.strip():
            record["context"] = hint.strip()
        return record

    return Conversion(list(problems.items()), convert)
