"""Video question answering as the paper evaluates it: 4 frames sampled uniformly per clip, each frame through the
vision encoder and the instruction-aware Q-Former, the frames' query outputs in time order as the LLM's prompt.

    python examples/video_qa.py                                    # embedded model, synthetic clips, offline
    python examples/video_qa.py --model outputs/quickstart/model   # the quickstart's trained shapes model
    python examples/video_qa.py --model Salesforce/instructblip-flan-t5-xl --clips 8

Steps: draw synthetic clips (a shape drifting across 6-12 frames, one colour per clip) and write them as folders of
frames with an MSVD-QA-style JSON-lines file; answer one clip with `generate`; evaluate the clips as the held-out
`msvd_qa` task (candidate ranking over the colours, resumable predictions file) and as `ivqa` (generation); save the
video model and processor, reload them with `AutoModel` / `AutoProcessor` and check the logits.

Any image checkpoint works: the video model has the image model's weights. The embedded default is untrained, so
its answers are arbitrary (the mechanics show); the quickstart's model answers colours from the frames.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModel, AutoProcessor

sys.path.insert(0, str(Path(__file__).resolve().parent))  # examples/shapes.py, when run from anywhere
import shapes  # noqa: E402

from hf_instructblip import (  # noqa: E402
    InstructBlipVideoConfig,
    InstructBlipVideoForConditionalGeneration,
    InstructBlipVideoProcessor,
)
from hf_instructblip.evaluate.runner import evaluate  # noqa: E402
from hf_instructblip.evaluate.tasks import load_records  # noqa: E402

QUESTION = "what colour is the shape ?"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint folder or Hub id (image or video; default: the embedded model)")
    parser.add_argument("--output-dir", default="outputs/video_qa")
    parser.add_argument("--clips", type=int, default=6)
    parser.add_argument("--num-frames", type=int, default=4, help="frames sampled per clip (the paper: 4)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def load(args: argparse.Namespace):
    """The video model and processor: from `--model`, or the embedded shapes model read frame by frame."""
    if args.model:
        model = InstructBlipVideoForConditionalGeneration.from_pretrained(args.model)
        processor = InstructBlipVideoProcessor.from_pretrained(args.model, num_frames=args.num_frames)
        return model.eval(), processor
    image_processor = shapes.build_processor()
    processor = InstructBlipVideoProcessor(
        image_processor.image_processor, image_processor.tokenizer, image_processor.qformer_tokenizer,
        num_query_tokens=shapes.NUM_QUERY_TOKENS, qformer_max_length=shapes.QFORMER_POSITIONS,
        num_frames=args.num_frames)
    image_model = shapes.build_model(image_processor, seed=args.seed)
    model = InstructBlipVideoForConditionalGeneration(InstructBlipVideoConfig(**image_model.config.to_dict()))
    model.load_state_dict(image_model.state_dict())  # the same weights, read frame by frame
    model.generation_config = image_model.generation_config
    return model.eval(), processor


def write_clips(folder: Path, count: int, seed: int) -> Path:
    """`count` clips as frame folders + `msvd.jsonl` (`video`, `question`, `candidates`, `answer`, `answers`)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(count):
        colour, shape = str(rng.choice(list(shapes.COLOURS))), str(rng.choice(shapes.SHAPES))
        clip = folder / "clips" / f"{i:03d}"
        clip.mkdir(parents=True, exist_ok=True)
        for t in range(int(rng.integers(6, 13))):  # clips of different lengths: the processor samples 4 frames
            shapes.draw_shape(colour, shape, rng).save(clip / f"frame_{t + 1}.png")
        rows.append({"video": f"clips/{i:03d}", "question": QUESTION, "candidates": list(shapes.COLOURS),
                     "answer": colour, "answers": [colour] * 2})
    data = folder / "msvd.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return data


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    output = Path(args.output_dir)
    model, processor = load(args)
    records = load_records(write_clips(output / "data", args.clips, args.seed))  # frame paths resolved, checked

    inputs = processor(videos=records[0]["video"], text=QUESTION, return_tensors="pt")
    print(f"one clip: pixel_values {list(inputs['pixel_values'].shape)} (batch, frames, 3, H, W), "
          f"{int((inputs['input_ids'] == processor.image_token_id).sum())} video placeholders")
    ids = model.generate(**inputs, max_new_tokens=4)
    echo = inputs["input_ids"] if model.config.use_decoder_only_language_model else None
    print(f"generate: {QUESTION!r} -> {processor.post_process_generation(ids, echo)[0]!r} "
          f"(truth: {records[0]['answer']!r})")

    for task in ("msvd_qa", "ivqa"):
        metrics = evaluate(model, processor, records, task, predictions_path=output / f"{task}_predictions.jsonl",
                           metrics_path=output / f"{task}_metrics.json", batch_size=4, progress=False,
                           generation_kwargs={"max_new_tokens": 4, "num_beams": 2})
        print(f"{task}: {metrics['metric']} {metrics['score']:.3f} over {metrics['num_examples']} clips")

    folder = output / "model"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    reloaded, reprocessor = AutoModel.from_pretrained(folder).eval(), AutoProcessor.from_pretrained(folder)
    again = reprocessor(videos=records[0]["video"], text=QUESTION, return_tensors="pt")
    with torch.no_grad():
        same = torch.allclose(reloaded(**again, labels=again["input_ids"]).logits,
                              model(**inputs, labels=inputs["input_ids"]).logits, atol=1e-5)
    print(f"reloaded as {type(reloaded).__name__} + {type(reprocessor).__name__}: logits "
          f"{'match' if same else 'DIFFER'}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
