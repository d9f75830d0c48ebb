"""examples/pretrain_qformer.py at a reduced size: stage 1 -> stage 2 -> instruction tuning runs offline, reports its
figures, and writes folders transformers reads (stage 1: `Blip2ForImageTextRetrieval`, stage 2:
`Blip2ForConditionalGeneration`)."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import torch
from transformers import Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_pretrain_qformer_example_runs_all_three_stages(tmp_path, capsys):
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    example = importlib.import_module("pretrain_qformer")
    torch.set_num_threads(1)
    out = tmp_path / "run"
    assert example.main(["--output-dir", str(out), "--vision-steps", "60", "--llm-steps", "40", "--stage1-steps",
                         "40", "--stage2-steps", "10", "--tuning-steps", "10", "--batch-size", "16",
                         "--eval-size", "48"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["chance"] == 1 / 16
    assert summary["recall_at_1"] > 2 * summary["chance"]  # stage 1 learned to match images and captions
    assert summary["caption_loss_after"] < summary["caption_loss_before"]
    assert 0 <= summary["held-in"] <= 1 and 0 <= summary["held-out"] <= 1
    printed = capsys.readouterr().out
    assert "image->text recall@1" in printed and "held-out caption loss" in printed and "held-in accuracy" in printed
    stage1 = Blip2ForImageTextRetrieval.from_pretrained(out / "stage1")
    stage2 = Blip2ForConditionalGeneration.from_pretrained(out / "blip2")
    assert stage1.config.num_query_tokens == stage2.config.num_query_tokens == example.shapes.NUM_QUERY_TOKENS
    assert (out / "instructblip" / "config.json").is_file()
