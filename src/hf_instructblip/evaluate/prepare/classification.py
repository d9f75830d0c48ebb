"""Two-way decisions: VSR (zero-shot split, test; true / false statements) and Hateful Memes (dev seen).

Records: `image`, `label` (0/1) and the prompt's text: `caption` (VSR's statement) or `text` (the meme's text,
the prompt's OCR slot).
"""

from __future__ import annotations

import os
from typing import Any

from ...json_lines import iter_json_lines
from .common import Conversion, Paths, field


def _label(item: Any, at: str) -> int:
    label = field(item, "label", "int", at)
    if label not in (0, 1):
        raise ValueError(f"{at}: field 'label' must be 0 or 1, found {label!r}.")
    return label


def vsr(annotations: str | os.PathLike, paths: Paths, **_: Any) -> Conversion:
    """VSR `splits/zeroshot/test.jsonl`: one {"image", "caption", "label", "relation", ...} a line; images are COCO
    2017 file names, all in the --images folder.

    Example:
        >>> vsr("zeroshot/test.jsonl", Paths("vsr/images", "vsr.jsonl")).items[0][1]["relation"]
        'left of'
    """
    lines = list(iter_json_lines(annotations))

    def convert(index: int, item: tuple[int, Any]) -> dict[str, Any]:
        number, row = item
        at = f"{annotations}: line {number}"
        return {"id": number, "image": paths.image(field(row, "image", "str", at), at),
                "caption": field(row, "caption", "str", at), "label": _label(row, at)}

    return Conversion(lines, convert)


def hateful_memes(annotations: str | os.PathLike, paths: Paths, **_: Any) -> Conversion:
    """Hateful Memes `dev_seen.jsonl`: one {"id", "img": "img/<id>.png", "label", "text"} a line; --images is the
    folder that holds `img/`.

    Example:
        >>> hateful_memes("dev_seen.jsonl", Paths("hateful_memes", "hm.jsonl")).items[0][1]["img"]
        'img/08291.png'
    """
    lines = list(iter_json_lines(annotations))

    def convert(index: int, item: tuple[int, Any]) -> dict[str, Any]:
        number, row = item
        at = f"{annotations}: line {number} (id {row.get('id')!r})"
        return {"id": field(row, "id", "int", at), "image": paths.image(field(row, "img", "str", at), at),
                "text": field(row, "text", "str", at), "label": _label(row, at)}

    return Conversion(lines, convert)
