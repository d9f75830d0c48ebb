"""Image(s) + instruction(s) -> answers, batched, with the LAVIS generation presets.

    python examples/generate.py                                         # the quickstart's model, procedural images
    python examples/generate.py cat.jpg dog.jpg --instruction "What is this?" --model Salesforce/instructblip-flan-t5-xl
    python examples/generate.py img.png --instruction "what colour is the shape ?" --preset short \
        --model outputs/quickstart/model

Presets (LAVIS `generate` defaults): "lavis" = beam search, 5 beams, 1-256 new tokens, repetition penalty 1.5,
length penalty 1 (long answers); "short" = the VQA preset, 5 beams, 1-10 new tokens, length penalty -1 (favours
short answers). `--sample` switches to nucleus sampling (top_p 0.9) as LAVIS's `use_nucleus_sampling`.

Without `--model`, the model `examples/quickstart.py` saved (`outputs/quickstart/model`, from the current folder)
answers; when there is none, an embedded untrained model does (its answers are arbitrary words of the shapes
vocabulary: it shows the mechanics). The first line printed says which model answered.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))  # examples/shapes.py, when run from anywhere
import shapes  # noqa: E402

import hf_instructblip  # noqa: E402,F401  (registers the Auto classes)
from hf_instructblip.templates import GENERATION_PRESETS, generation_preset  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="*", help="image files (default: a few procedural shapes images)")
    parser.add_argument("--instruction", action="append",
                        help="instruction; give one for every image, or one for all (repeatable)")
    parser.add_argument("--model", help="checkpoint folder or Hub id (default: the embedded small model)")
    parser.add_argument("--preset", choices=GENERATION_PRESETS, default="lavis")
    parser.add_argument("--sample", action="store_true", help="nucleus sampling, as LAVIS's use_nucleus_sampling")
    parser.add_argument("--max-new-tokens", type=int, help="override the preset's maximum")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-json", help="also write [{image, instruction, answer}] to this file")
    return parser.parse_args(argv)


def generation_settings(preset: str, sample: bool, max_new_tokens: int | None = None) -> dict:
    """`generate` keywords of a preset (`templates.generation_preset`), with `--max-new-tokens` applied."""
    settings = generation_preset(preset, sample=sample)
    if max_new_tokens is not None:
        if max_new_tokens < 1:
            raise ValueError(f"`--max-new-tokens` must be >= 1, found {max_new_tokens}.")
        settings["max_new_tokens"] = max_new_tokens
    return settings


QUICKSTART_MODEL = Path("outputs/quickstart/model")  # where examples/quickstart.py saves by default


def load(model_id: str | None, seed: int):
    """`--model` through the Auto classes; without it the quickstart's saved model, else the embedded untrained
    one (no download). Prints which model answers."""
    if not model_id and (QUICKSTART_MODEL / "config.json").is_file():
        model_id = str(QUICKSTART_MODEL)
        print(f"model: {model_id} (saved by examples/quickstart.py)")
    elif model_id:
        print(f"model: {model_id}")
    if model_id:
        model, processor = shapes.load_checkpoint(model_id)
        return model.eval(), processor
    print(f"model: the embedded untrained model (no {QUICKSTART_MODEL}: its answers are arbitrary; run "
          "examples/quickstart.py first for a trained one)")
    processor = shapes.build_processor()
    return shapes.build_model(processor, seed=seed).eval(), processor


def inputs_from(args: argparse.Namespace) -> tuple[list[str], list[Image.Image], list[str]]:
    """(names, images, instructions), one of each per item."""
    if args.images:
        names = list(args.images)
        images = [Image.open(path).convert("RGB") for path in names]
        instructions = args.instruction or ["What is in the image?"]
    else:  # one procedural image per shapes task, asked that task's question
        rng = np.random.default_rng(args.seed)
        records = [shapes.make_records(task, 1, args.seed + i)[0] for i, task in enumerate(shapes.TASKS)]
        records += [shapes.make_records(task, 1, args.seed + 10 + i, held_out=True)[0]
                    for i, task in enumerate(shapes.TASKS)]
        rng.shuffle(records)
        names = [f"shapes[{i}]" for i in range(len(records))]
        images = [r["image"] for r in records]
        instructions = args.instruction or [r["instruction"] for r in records]
    if len(instructions) == 1:
        instructions = instructions * len(images)
    if len(instructions) != len(images):
        raise ValueError(f"`--instruction`: give one for all images or one per image; found {len(instructions)} "
                         f"instructions for {len(images)} images.")
    return names, images, instructions


@torch.no_grad()
def answer(model, processor, images: list[Image.Image], instructions: list[str], settings: dict,
           batch_size: int) -> list[str]:
    """Batched generation; batched prompts are left padded (the processor's default), which decoder-only
    generation needs."""
    answers = []
    echo = model.config.use_decoder_only_language_model  # decoder-only output starts with the prompt
    for start in range(0, len(images), batch_size):
        inputs = processor(images=images[start : start + batch_size],
                           text=instructions[start : start + batch_size], return_tensors="pt").to(model.device)
        generated = model.generate(**inputs, **settings)
        answers += processor.post_process_generation(generated, inputs["input_ids"] if echo else None)
    return answers


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    settings = generation_settings(args.preset, args.sample, args.max_new_tokens)
    model, processor = load(args.model, args.seed)
    names, images, instructions = inputs_from(args)
    print(f"preset {args.preset}: {settings}")
    answers = answer(model, processor, images, instructions, settings, args.batch_size)
    for name, instruction, text in zip(names, instructions, answers):
        print(f"{name:12} {instruction!r:42} -> {text!r}")
    if args.output_json:
        rows = [{"image": n, "instruction": i, "answer": a} for n, i, a in zip(names, instructions, answers)]
        Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output_json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
