"""`generate` side by side: ours vs transformers' InstructBLIP, same weights, same inputs, one run.

For each backbone x search (greedy / beam) x batch it times `generate` with N new tokens and with 1 new token
(min_new_tokens = max_new_tokens, so both sides do exactly that much work) and prints JSON lines:
- `ttft_s`: the 1-token call = image path + Q-Former + LLM prefill + one token (time to first token);
- `decode_ms_per_step`: (t_N - t_1) / (N - 1), per repetition, then median / min / max;
- `total_s`: the N-token call;
- a `greedy_ids_equal` check: ours and theirs returned the same ids in the timed calls.

    python bench/bench_generate.py                                  # CPU preset
    python bench/bench_generate.py --device cuda --preset vicuna7b  # real shape, bf16, random weights
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch

import common


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = common.base_parser(__doc__.split("\n", 1)[0])
    parser.add_argument("--new-tokens", type=int, help="N: new tokens per call (override the preset)")
    parser.add_argument("--batches", type=int, nargs="+", help="batch sizes (override the preset)")
    parser.add_argument("--beams", type=int, nargs="+", help="num_beams values; 1 = greedy (override the preset)")
    parser.add_argument("--cache-implementation", help="passed to generate on both sides, e.g. static")
    return parser.parse_args(argv)


def generate_call(model: torch.nn.Module, inputs: dict, beams: int, new_tokens: int,
                  cache_implementation: str | None) -> Callable[[], Any]:
    settings = dict(do_sample=False, num_beams=beams, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    if cache_implementation:
        settings["cache_implementation"] = cache_implementation
    return lambda: model.generate(**inputs, **settings)


def ids_check(context: dict, ours: torch.Tensor, theirs: torch.Tensor) -> dict:
    """Equality of the two sides' ids, and where they first differ if they do."""
    record = {**context, "check": "greedy_ids_equal" if context["search"] == "greedy" else "beam_ids_equal",
              "shape": list(ours.shape)}
    same_shape = ours.shape == theirs.shape
    record["equal"] = bool(same_shape and torch.equal(ours.cpu(), theirs.cpu()))
    if same_shape and not record["equal"]:
        differs = (ours.cpu() != theirs.cpu()).any(dim=0).nonzero()
        record["first_differing_position"] = int(differs[0])
    return record


def bench_backbone(args: argparse.Namespace, preset: common.Preset, dtype: torch.dtype, backbone: str) -> None:
    pair = common.build_pair(preset, backbone, args.device, dtype, args.seed)
    new_tokens = args.new_tokens or preset.new_tokens
    for beams in args.beams or preset.beams:
        for batch in args.batches or preset.batches:
            inputs = common.generate_inputs(preset, backbone, batch, args.device, dtype, args.seed)
            calls = {(side, n): generate_call(pair[side], inputs, beams, n, args.cache_implementation)
                     for n in (1, new_tokens) for side in common.SIDES}
            times, outputs = common.time_alternating(calls, args.reps or preset.reps,
                                                     preset.warmup if args.warmup is None else args.warmup,
                                                     args.device)
            context = {"bench": "generate", "preset": preset.name, "device": args.device, "dtype": str(dtype)[6:],
                       "backbone": backbone, "search": "greedy" if beams == 1 else f"beam{beams}",
                       "batch": batch, "new_tokens": new_tokens,
                       "cache": args.cache_implementation or "default"}
            decode = {side: [(t_n - t_1) / (new_tokens - 1) for t_1, t_n in
                             zip(times[side, 1], times[side, new_tokens])] for side in common.SIDES}
            common.emit(common.figure(context, "ttft_s", "s", times["ours", 1], times["theirs", 1]))
            common.emit(common.figure(context, "decode_ms_per_step", "ms", decode["ours"], decode["theirs"], 1e3))
            common.emit(common.figure(context, "total_s", "s", times["ours", new_tokens],
                                      times["theirs", new_tokens]))
            common.emit(ids_check(context, outputs["ours", new_tokens], outputs["theirs", new_tokens]))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    preset, dtype, backbones = common.setup(args)
    if (args.new_tokens or preset.new_tokens) < 2:
        raise ValueError(f"`--new-tokens` must be >= 2 to separate decode from the first token, "
                         f"found {args.new_tokens}.")
    common.emit({"bench": "generate", "env": common.environment(args.device),
                 "preset": common.preset_record(preset)})
    for backbone in backbones:
        bench_backbone(args, preset, dtype, backbone)
        common.release(args.device)  # the pair is gone with the call's frame


if __name__ == "__main__":
    main()
