"""bench/: the side-by-side scripts run end to end on the smoke preset, print parseable JSON lines, and check
ours against transformers (identical greedy ids, equal loss); the pair builder and the peak-memory method."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import bench_generate  # noqa: E402
import bench_train  # noqa: E402
import common  # noqa: E402


def run(main, argv: list[str], capsys) -> list[dict]:
    """Run a script's `main` in this process; every stdout line must be one JSON object."""
    threads = torch.get_num_threads()
    try:
        main(argv)
    finally:
        torch.set_num_threads(threads)
    lines = capsys.readouterr().out.strip().splitlines()
    return [json.loads(line) for line in lines]


def figures(records: list[dict], metric: str) -> list[dict]:
    return [r for r in records if r.get("metric") == metric]


def assert_figure(record: dict) -> None:
    for side in common.SIDES:
        stats = record[side]
        assert stats["min"] <= stats["median"] <= stats["max"], record
    assert record["ratio"] == pytest.approx(record["ours"]["median"] / record["theirs"]["median"], rel=1e-3)


def test_generate_smoke(capsys):
    records = run(bench_generate.main, ["--preset", "smoke"], capsys)
    env = records[0]["env"]
    assert env["torch"] == torch.__version__ and env["nproc"] >= 1 and env["command"].startswith("python")
    preset = common.PRESETS["smoke"]
    cases = {(b, s, n) for b in preset.backbones for s in ("greedy", "beam2") for n in preset.batches}
    for metric in ("ttft_s", "decode_ms_per_step", "total_s"):
        found = figures(records, metric)
        assert {(r["backbone"], r["search"], r["batch"]) for r in found} == cases
        for record in found:
            assert record["reps"] == preset.reps
            if metric != "decode_ms_per_step":  # a difference of two timings may be negative under noise
                assert record["ours"]["min"] > 0 and record["theirs"]["min"] > 0
                assert_figure(record)
    greedy = [r for r in records if r.get("check") == "greedy_ids_equal"]
    assert {(r["backbone"], r["batch"]) for r in greedy} == {(b, n) for b in preset.backbones for n in preset.batches}
    assert all(r["equal"] for r in greedy), greedy
    # decoder-only returns prompt + new tokens, T5 the decoder start + new tokens
    prompt = preset.num_query_tokens + preset.prompt_len
    assert {r["backbone"]: r["shape"][1] for r in greedy} == {"llama": prompt + preset.new_tokens,
                                                               "t5": 1 + preset.new_tokens}


def test_train_smoke_with_peak_memory_subprocesses(capsys):
    records = run(bench_train.main, ["--preset", "smoke", "--backbones", "llama"], capsys)
    (check,) = [r for r in records if r.get("check") == "loss_equal"]
    assert check["equal"] and check["logits_max_abs_diff"] <= 1e-5, check
    (check,) = [r for r in records if r.get("check") == "train_mode_loss_equal"]
    assert check["equal"] and check["ours_fused_head_loss"], check  # the fused head loss equals theirs
    (trainable,) = [r["trainable_params"] for r in records if "trainable_params" in r]
    preset = common.PRESETS["smoke"]
    hidden, vocab = preset.qformer["hidden_size"], preset.qformer["vocab_size"]
    assert trainable > vocab * hidden  # Q-Former (word embeddings alone are vocab x hidden) + queries + projection
    for metric in ("step_s", "samples_per_s", "peak_memory_mib", "peak_memory_total_mib"):
        (record,) = figures(records, metric)
        assert record["ours"]["min"] > 0 and record["theirs"]["min"] > 0, record
        assert_figure(record)
    (memory,) = figures(records, "peak_memory_mib")
    # at least the AdamW state (2 fp32 moments) plus the gradients of the trainable weights
    assert memory["theirs"]["median"] * 2**20 >= 3 * 4 * trainable
    assert "clear_refs" in memory["method"]


def test_gpu_presets_code_path_on_cpu(capsys):
    """`--shrink`: the real-shape presets' path (bf16, their backbone and vocabulary) at toy widths."""
    records = run(bench_generate.main, ["--preset", "vicuna7b", "--shrink", "--batches", "1", "--beams", "1"], capsys)
    (check,) = [r for r in records if r.get("check") == "greedy_ids_equal"]
    assert check["equal"] and check["dtype"] == "bfloat16" and check["backbone"] == "llama"
    records = run(bench_train.main, ["--preset", "flant5xl", "--shrink", "--no-memory"], capsys)
    for name in ("loss_equal", "train_mode_loss_equal"):
        (check,) = [r for r in records if r.get("check") == name]
        assert check["equal"] and check["dtype"] == "bfloat16" and check["backbone"] == "t5", check
    assert figures(records, "step_s") and not figures(records, "peak_memory_mib")


def test_build_pair_copies_transformers_weights():
    preset = common.PRESETS["smoke"]
    pair = common.build_pair(preset, "t5", "cpu", torch.bfloat16)
    ours, theirs = pair["ours"].state_dict(), pair["theirs"].state_dict()
    assert set(ours) == set(theirs)
    for key in theirs:
        assert ours[key].dtype == torch.bfloat16 and torch.equal(ours[key], theirs[key]), key
        assert ours[key].data_ptr() != theirs[key].data_ptr(), f"{key} shares storage with transformers' model"
    # tied T5 embeddings stay one tensor on our side
    shared = pair["ours"].language_model
    assert shared.encoder.embed_tokens.weight.data_ptr() == shared.shared.weight.data_ptr()


def test_peak_memory_sees_a_64_mib_allocation():
    common.warm_autograd_runtime("cpu")
    with common.PeakMemory("cpu") as peak:
        block = torch.ones(16 * 2**20)  # 64 MiB, touched
        del block
    assert 62 * 2**20 <= peak.increase < 70 * 2**20, peak  # RSS also moves by a few pages on its own


@pytest.mark.parametrize("argv, message", [
    (["--preset", "huge"], "`--preset` must be one of"),
    (["--preset", "vicuna7b"], "pass `--device cuda`"),
    (["--preset", "smoke", "--backbones", "llama", "--new-tokens", "1"], "`--new-tokens` must be >= 2"),
])
def test_bad_arguments_raise(argv, message, capsys):
    with pytest.raises(ValueError, match=message):
        bench_generate.main(argv)


def test_backbone_not_in_preset_raises():
    with pytest.raises(ValueError, match="`--backbones`: preset 'vicuna7b-shrunk' has \\['llama'\\], found \\['t5'\\]"):
        bench_train.main(["--preset", "vicuna7b", "--shrink", "--backbones", "t5"])
