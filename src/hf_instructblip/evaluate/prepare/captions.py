"""Captioning: NoCaps val (COCO-style caption file) and Flickr30K Karpathy test (Karpathy's `dataset_flickr30k.json`).

Records: `image`, `answers` (the reference captions), `id`; NoCaps adds `domain` (in / near / out-of-domain).
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from typing import Any

from .common import Conversion, Paths, Skip, expect, field, load_json, where


def nocaps(annotations: str | os.PathLike, paths: Paths, **_: Any) -> Conversion:
    """`nocaps_val_4500_captions.json`: {"images": [{"id", "file_name", "domain", ...}], "annotations":
    [{"image_id", "id", "caption"}]} -> one record per image with its (10) captions.

    Example:
        >>> nocaps("nocaps_val_4500_captions.json", Paths("nocaps/val", "nocaps.jsonl")).items[0]["file_name"]
        '0013ea2087020901.jpg'
    """
    data = expect(load_json(annotations), dict, annotations, "the top level")
    images = expect(data.get("images"), list, annotations, "'images'")
    captions: dict[Any, list[str]] = defaultdict(list)
    for index, ann in enumerate(expect(data.get("annotations"), list, annotations, "'annotations'")):
        at = f"{annotations}: annotations[{index}]"
        image_id = field(ann, "image_id", "int", at)
        captions[image_id].append(field(ann, "caption", "str", at))

    def convert(index: int, image: Any) -> dict[str, Any]:
        at = where(annotations, index, image.get("id") if isinstance(image, dict) else None)
        image_id = field(image, "id", "int", at)
        if not captions.get(image_id):
            raise ValueError(f"{at}: field 'id': no caption in 'annotations' has image_id {image_id}.")
        record = {"id": image_id, "image": paths.image(field(image, "file_name", "str", at), at),
                  "answers": captions[image_id]}
        if isinstance(image.get("domain"), str):
            record["domain"] = image["domain"]
        return record

    return Conversion(images, convert)


def flickr30k(annotations: str | os.PathLike, paths: Paths, **_: Any) -> Conversion:
    """Karpathy's `dataset_flickr30k.json`: {"images": [{"filename", "imgid", "split", "sentences": [{"raw", ...}]}]}
    -> the 1,000 images of split "test", each with its (5) raw captions.

    Example:
        >>> flickr30k("dataset_flickr30k.json", Paths("flickr30k-images", "flickr.jsonl")).items[0]["split"]
        'train'
    """
    data = expect(load_json(annotations), dict, annotations, "the top level")
    images = expect(data.get("images"), list, annotations, "'images'")

    def convert(index: int, image: Any) -> dict[str, Any]:
        at = where(annotations, index, image.get("imgid") if isinstance(image, dict) else None)
        if field(image, "split", "str", at) != "test":
            raise Skip(f"split {image['split']!r}, not 'test'")
        filename = field(image, "filename", "str", at)
        sentences = field(image, "sentences", "list", at)
        raws = [field(s, "raw", "str", f"{at} sentences[{i}]") for i, s in enumerate(sentences)]
        if not raws:
            raise ValueError(f"{at}: field 'sentences' is empty.")
        return {"id": Path(filename).stem, "image": paths.image(filename, at), "answers": raws}

    return Conversion(images, convert)
