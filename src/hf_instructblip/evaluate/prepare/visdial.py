"""Visual Dialog v1.0 val: every round of every dialog is one example, ranked over its 100 candidate answers (MRR).

Records: `image`, `question`, `context` (the dialog history the prompt's "Dialog history:" slot shows: the image
caption, then each earlier round as "q: ... a: ...", LAVIS's VisDial history format), `candidates` (the 100
answer options, in the file's order) and `answer` (the index of the ground-truth option).
"""

from __future__ import annotations

import os
from typing import Any

from .common import Conversion, Paths, expect, field, load_json, where


def _text(table: list, table_name: str, index: int, name: str, at: str) -> str:
    """`table[index]`: a question or answer string of the file's shared lists."""
    if not 0 <= index < len(table) or not isinstance(table[index], str):
        raise ValueError(f"{at}: field {name!r} must index data[{table_name!r}] (0..{len(table) - 1}), "
                         f"found {index}.")
    return table[index]


def visdial(annotations: str | os.PathLike, paths: Paths, **_: Any) -> Conversion:
    """`visdial_1.0_val.json`: {"data": {"questions": [str], "answers": [str], "dialogs": [{"image_id", "caption",
    "dialog": [{"question", "answer", "answer_options" (100 indices), "gt_index"}]}]}}; images
    `VisualDialog_val2018_<image_id, 12 digits>.jpg` in --images. One record per round, id "<image_id>_<round>".

    Example:
        >>> len(visdial("visdial_1.0_val.json", Paths("VisualDialog_val2018", "visdial.jsonl")).items)
        20640
    """
    top = expect(load_json(annotations), dict, annotations, "the top level")
    data = expect(top.get("data"), dict, annotations, "'data'")
    questions = expect(data.get("questions"), list, annotations, "data['questions']")
    answers = expect(data.get("answers"), list, annotations, "data['answers']")
    rounds = []  # (dialog index, dialog, round index): the progress bar counts examples, not dialogs
    for d, dialog in enumerate(expect(data.get("dialogs"), list, annotations, "data['dialogs']")):
        at = where(annotations, d, dialog.get("image_id") if isinstance(dialog, dict) else None)
        rounds.extend((d, dialog, r) for r in range(len(field(dialog, "dialog", "list", at))))

    def convert(index: int, item: tuple[int, Any, int]) -> dict[str, Any]:
        d, dialog, r = item
        at = f"{where(annotations, d, dialog.get('image_id'))} round {r + 1}"
        image_id = field(dialog, "image_id", "int", at)
        history = [field(dialog, "caption", "str", at)]
        for earlier in range(r):
            turn = dialog["dialog"][earlier]
            t_at = f"{where(annotations, d, image_id)} round {earlier + 1}"
            asked = _text(questions, "questions", field(turn, "question", "int", t_at), "question", t_at)
            answered = _text(answers, "answers", field(turn, "answer", "int", t_at), "answer", t_at)
            history.append(f"q: {asked} a: {answered}")
        turn = dialog["dialog"][r]
        options = field(turn, "answer_options", "ints", at)
        if len(options) != 100:
            raise ValueError(f"{at}: field 'answer_options' must hold 100 answer indices, found {len(options)}.")
        if "gt_index" not in turn:
            raise ValueError(f"{at}: field 'gt_index' is missing (the VisDial test split marks only the last "
                             "round; the paper evaluates val).")
        gt = field(turn, "gt_index", "int", at)
        if not 0 <= gt < 100:
            raise ValueError(f"{at}: field 'gt_index' must be in 0..99, found {gt}.")
        return {"id": f"{image_id}_{r + 1}", "image": paths.image(f"VisualDialog_val2018_{image_id:012d}.jpg", at),
                "question": _text(questions, "questions", field(turn, "question", "int", at), "question", at),
                "context": " ".join(history),
                "candidates": [_text(answers, "answers", o, "answer_options", at) for o in options], "answer": gt}

    return Conversion(rounds, convert)
