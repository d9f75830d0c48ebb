"""One image loader for inference, training and evaluation: every path turns the same file into the same pixels,
and image kinds that used to come out silently wrong are scaled like arrays or refused clearly."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tiny
import torch
from PIL import Image

from hf_instructblip import InstructBlipDataCollator, InstructionDataset
from hf_instructblip.evaluate.tasks import load_records
from hf_instructblip.model.images import load_image

TRANSPARENT_RED = (255, 0, 0, 0)  # fully transparent: composited onto white it is white, not red


@pytest.fixture
def rgba_file(tmp_path):
    image = Image.new("RGBA", (40, 40), TRANSPARENT_RED)
    image.putpixel((5, 5), (0, 0, 255, 255))  # one opaque blue pixel
    image.save(tmp_path / "rgba.png")
    return tmp_path / "rgba.png"


def test_processor_collator_mixture_and_runner_see_the_same_pixels(rgba_file, tmp_path):
    processor = tiny.processor("llama")
    expected = processor(images=Image.open(rgba_file), text="q", return_tensors="pt")["pixel_values"]
    assert load_image(rgba_file).getpixel((0, 0)) == (255, 255, 255)  # transparency on white, as transformers

    record = InstructionDataset([{"image": rgba_file.name, "question": "q", "answer": "a"}], task="vqa",
                                image_root=tmp_path)[0]  # training: a mixture source reading the file
    collated = InstructBlipDataCollator(processor, decoder_only=True)([record])["pixel_values"]
    (tmp_path / "data.jsonl").write_text(json.dumps({"image": rgba_file.name, "question": "q", "answer": "a"}))
    evaluated = load_image(load_records(tmp_path / "data.jsonl")[0]["image"])  # evaluation: the runner's records
    evaluation_pixels = processor(images=evaluated, text="q", return_tensors="pt")["pixel_values"]
    for pixels in (collated, evaluation_pixels):
        torch.testing.assert_close(pixels, expected, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["I;16", "F"])
def test_16_bit_and_float_pil_images_are_scaled_like_arrays(mode):
    values = np.linspace(0.0, 1.0, 64, dtype=np.float32).reshape(8, 8)
    if mode == "I;16":
        pil = Image.fromarray((values * 65535).round().astype(np.uint16))  # mode I;16
    else:
        pil = Image.fromarray(values, mode="F")
    expected = load_image(values)  # the same values as a float array in [0, 1]
    assert np.array_equal(np.asarray(load_image(pil)), np.asarray(expected))
    assert np.array_equal(np.asarray(load_image((values * 65535).round().astype(np.uint16))), np.asarray(expected))
    assert np.asarray(load_image(pil)).max() == 255 and np.asarray(load_image(pil)).min() == 0


@pytest.mark.parametrize(
    ("image", "error", "pattern"),
    [
        (np.full((4, 4, 3), np.nan, dtype=np.float32), ValueError, r"`image` holds NaN or infinite values"),
        (np.full((4, 4), np.inf, dtype=np.float64), ValueError, r"`image` holds NaN or infinite values"),
        (Image.fromarray(np.full((4, 4), 2.0, dtype=np.float32), mode="F"), ValueError,
         r"`image` must hold values in \[0, 1\], found \[2, 2\]"),
        (Image.new("I", (4, 4), 70000), TypeError, r"32-bit integer PIL image \(mode 'I'\)"),
        (b"not an image", ValueError, r"cannot read an image"),
        ({"bytes": None, "path": None}, ValueError,
         r"`image` is an image dict without an image: expected non-empty 'bytes' or a 'path' .*found "
         r"\{'bytes': NoneType, 'path': NoneType\}"),
    ],
    ids=["nan-array", "inf-array", "float-pil-out-of-range", "int32-pil", "corrupt-bytes", "empty-dict"],
)
def test_unreadable_images_are_refused_clearly(image, error, pattern):
    with pytest.raises(error, match=pattern):
        load_image(image)
