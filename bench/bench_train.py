"""Q-Former-only training step side by side: ours vs transformers' InstructBLIP, same weights, same batch.

Vision encoder and LLM are frozen on both sides (`requires_grad_(False)` and eval mode; ours additionally through
`hf_instructblip.freeze_for_instruction_tuning`); AdamW on the Q-Former, queries and projection. Prints JSON lines:
- `step_s` and `samples_per_s`: forward + backward + optimizer step, timed alternately in this process;
- `peak_memory_mib`: peak memory of the first `--memory-steps` steps (optimizer state included) over the
  memory held after building the model, each side measured alone in a fresh subprocess
  (`peak_memory_total_mib`: the absolute peak, weights included);
- `loss_equal` / `train_mode_loss_equal` checks: both sides' loss on the batch in eval mode, and in training
  mode with the Q-Former's dropout off (ours then takes its fused LM-head loss), before training.

    python bench/bench_train.py                                  # CPU preset
    python bench/bench_train.py --device cuda --preset vicuna7b  # real shape, bf16, random weights
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Callable

import torch

import common
from hf_instructblip import VisionFeatureCache, freeze_for_instruction_tuning

MIB = 1 / 2**20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = common.base_parser(__doc__.split("\n", 1)[0])
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--adamw", choices=("fused", "foreach", "for-loop"), default="fused",
                        help="AdamW implementation (default fused: Trainer's default optim, adamw_torch_fused)")
    parser.add_argument("--memory-steps", type=int, default=3, help="steps run by each peak-memory subprocess")
    parser.add_argument("--vision-cache", action="store_true",
                        help="ours reuses cached vision features (a later epoch's steady state; transformers has no "
                             "such cache, so its side is unchanged)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--memory-child", choices=common.SIDES, help=argparse.SUPPRESS)  # internal
    return parser.parse_args(argv)


def prepare_for_training(model: torch.nn.Module, side: str) -> int:
    """Freeze vision + LLM (eval mode: no dropout in them), train the rest; returns the trainable count."""
    model.vision_model.requires_grad_(False)
    model.language_model.requires_grad_(False)
    model.train()
    if side == "ours":
        freeze_for_instruction_tuning(model)  # also pins the frozen parts in eval mode
    else:  # the same, by hand: what LAVIS does and what freeze_for_instruction_tuning does for ours
        model.vision_model.eval()
        model.language_model.eval()
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def side_batch(batch: dict, side: str) -> dict:
    """`batch` as each side's training forward gets it: ours as `InstructBlipTrainer` calls it (fused head loss)."""
    return {**batch, "fused_head_loss": True} if side == "ours" else batch


def vision_cache_for(args: argparse.Namespace, side: str) -> VisionFeatureCache | None:
    """A cache stored on the bench device for ours with `--vision-cache` (transformers has none)."""
    return VisionFeatureCache(args.device) if side == "ours" and args.vision_cache else None


def make_step(model: torch.nn.Module, batch: dict, lr: float, adamw: str = "fused",
              vision_cache: VisionFeatureCache | None = None) -> Callable[[], float]:
    """One optimisation step on `batch` (fresh AdamW over the trainable parameters); returns the loss. With
    `vision_cache`, every step looks the batch's images up in it first, as `InstructBlipTrainer` does."""
    variant = {"fused": dict(fused=True), "foreach": dict(foreach=True), "for-loop": dict(foreach=False)}[adamw]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, **variant)
    if vision_cache is not None:
        rows = batch["pixel_values"].shape[0]
        batch = {**batch, "image_ids": torch.arange(rows, device=batch["pixel_values"].device)}

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        inputs = batch if vision_cache is None else vision_cache.model_inputs(model, batch)
        loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def loss_check(context: dict, pair: dict, batch: dict, dtype: torch.dtype, training: bool = False) -> dict:
    """Both sides' loss (and logits, where both return them) on the same batch, without dropout.

    `training=False`: eval mode. `training=True`: after `prepare_for_training`, in training mode with only the
    Q-Former's dropout switched off, so ours takes its fused LM-head loss (`logits` None) and transformers its
    logits. Identical weights => equal up to float rounding; in bf16 transformers' T5 takes the loss of bf16
    logits while ours upcasts them first, hence the relative tolerance.
    """
    for model in pair.values():
        model.qformer.eval() if training else model.eval()
    with torch.no_grad():
        outputs = {side: pair[side](**(side_batch(batch, side) if training else batch)) for side in common.SIDES}
    for model in pair.values():
        model.qformer.train(training)
    losses = {side: float(outputs[side].loss) for side in common.SIDES}
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    diff = abs(losses["ours"] - losses["theirs"])
    record = {**context, "check": "train_mode_loss_equal" if training else "loss_equal", "ours": losses["ours"],
              "theirs": losses["theirs"], "abs_diff": diff, "tolerance": tolerance,
              "equal": diff <= tolerance * max(1.0, abs(losses["theirs"]))}
    ours_logits, theirs_logits = outputs["ours"].logits, outputs["theirs"].logits
    if ours_logits is not None and ours_logits.shape == theirs_logits.shape:
        record["logits_max_abs_diff"] = float((ours_logits.float() - theirs_logits.float()).abs().max())
    record["ours_fused_head_loss"] = ours_logits is None
    return record


def memory_child(args: argparse.Namespace) -> None:
    """Subprocess body: build one side alone, then report the peak memory of its first training steps."""
    preset, dtype, backbones = common.setup(args)
    model = common.build_one(args.memory_child, preset, backbones[0], args.device, dtype)
    prepare_for_training(model, args.memory_child)
    batch = side_batch(common.train_batch(preset, backbones[0], args.device, dtype, args.seed), args.memory_child)
    step = make_step(model, batch, args.lr, args.adamw, vision_cache_for(args, args.memory_child))
    common.warm_autograd_runtime(args.device)
    with common.PeakMemory(args.device) as peak:
        for _ in range(args.memory_steps):
            step()
        common.synchronize(args.device)
    print(json.dumps({"side": args.memory_child, "increase": peak.increase, "total": peak.total,
                      "base": peak.base, "method": peak.method}), flush=True)


def memory_command(args: argparse.Namespace, backbone: str, side: str) -> list[str]:
    """The command line that runs `memory_child` for `side` in a fresh interpreter."""
    command = [sys.executable, __file__, "--memory-child", side, "--preset", args.preset, "--device", args.device,
               "--backbones", backbone, "--seed", str(args.seed), "--memory-steps", str(args.memory_steps),
               "--lr", str(args.lr), "--adamw", args.adamw]
    command += ["--vision-cache"] if args.vision_cache else []
    command += ["--shrink"] if args.shrink else []
    command += ["--dtype", args.dtype] if args.dtype else []
    command += ["--threads", str(args.threads)] if args.threads else []
    return command


def measure_memory(args: argparse.Namespace, backbone: str) -> dict[str, dict]:
    """Each side's `memory_child` report. On CPU both run at once (each reads only its own RSS); on CUDA one
    after the other, so neither can crowd the other out of GPU memory."""
    env = dict(os.environ)
    on_cpu = torch.device(args.device).type == "cpu"
    if on_cpu:
        # A fixed mmap threshold stops glibc from moving it up after frees, so every tensor >= 64 KiB is its own
        # mapping, returned to the OS when freed: RSS then tracks live tensors (repeat runs agree within 1 MiB,
        # against +-15 MiB with the default dynamic threshold).
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    reports, running = {}, {}
    for side in common.SIDES:
        running[side] = subprocess.Popen(memory_command(args, backbone, side), stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, text=True, env=env)
        if not on_cpu:
            reports[side] = _report(side, backbone, running[side])
    for side, process in running.items():
        if side not in reports:
            reports[side] = _report(side, backbone, process)
    return reports


def _report(side: str, backbone: str, process: subprocess.Popen) -> dict:
    stdout, stderr = process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"peak-memory subprocess for {side}/{backbone} failed:\n{stderr[-3000:]}")
    return json.loads(stdout.strip().splitlines()[-1])


def bench_backbone(args: argparse.Namespace, preset: common.Preset, dtype: torch.dtype, backbone: str) -> None:
    context = {"bench": "train", "preset": preset.name, "device": args.device, "dtype": str(dtype)[6:],
               "backbone": backbone, "batch": preset.train_batch,
               "text_tokens": preset.train_prompt_len + preset.train_answer_len}
    if args.vision_cache:
        context["vision_cache"] = "ours"
    pair = common.build_pair(preset, backbone, args.device, dtype, args.seed)
    batch = common.train_batch(preset, backbone, args.device, dtype, args.seed)
    common.emit(loss_check(context, pair, batch, dtype))
    trainable = {side: prepare_for_training(pair[side], side) for side in common.SIDES}
    if trainable["ours"] != trainable["theirs"]:
        raise RuntimeError(f"Trainable parameter counts differ: {trainable}.")
    common.emit({**context, "trainable_params": trainable["ours"]})
    common.emit(loss_check(context, pair, batch, dtype, training=True))
    steps = {side: make_step(pair[side], side_batch(batch, side), args.lr, args.adamw, vision_cache_for(args, side))
             for side in common.SIDES}
    times, _ = common.time_alternating(steps, args.reps or preset.train_reps,
                                       preset.train_warmup if args.warmup is None else args.warmup, args.device)
    common.emit(common.figure(context, "step_s", "s", times["ours"], times["theirs"]))
    rates = {side: [preset.train_batch / t for t in times[side]] for side in common.SIDES}
    common.emit(common.figure(context, "samples_per_s", "samples/s", rates["ours"], rates["theirs"]))
    del pair, steps
    common.release(args.device)
    if args.no_memory:
        return
    peaks = measure_memory(args, backbone)
    memory_context = {**context, "method": peaks["ours"]["method"], "memory_steps": args.memory_steps}
    for metric, key in (("peak_memory_mib", "increase"), ("peak_memory_total_mib", "total")):
        common.emit(common.figure(memory_context, metric, "MiB", [peaks["ours"][key]], [peaks["theirs"][key]], MIB))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.memory_child:
        memory_child(args)
        return
    preset, dtype, backbones = common.setup(args)
    common.emit({"bench": "train", "env": common.environment(args.device), "preset": common.preset_record(preset)})
    for backbone in backbones:
        bench_backbone(args, preset, dtype, backbone)


if __name__ == "__main__":
    main()
