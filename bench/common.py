"""Shared pieces of the side-by-side benchmarks: presets, model pairs with identical weights, inputs, timing, JSON.

"ours" is `hf_instructblip.InstructBlipForConditionalGeneration`, "theirs" is transformers' own
`InstructBlipForConditionalGeneration`; both are built from the same shape and hold the same weights.
Every figure is printed as one JSON line (see `emit`), so runs can be diffed and collected with `jq`.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import transformers
from accelerate import init_empty_weights
from transformers import AutoConfig
from transformers import InstructBlipConfig as TheirConfig
from transformers import InstructBlipForConditionalGeneration as TheirModel

import hf_instructblip
from hf_instructblip import InstructBlipConfig as OurConfig
from hf_instructblip import InstructBlipForConditionalGeneration as OurModel

SIDES = ("ours", "theirs")
BACKBONES = ("llama", "t5")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# --- presets ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Preset:
    """One benchmark shape: model sizes, prompt / answer lengths, repetitions and dtype.

    `text` maps a backbone (`llama` = decoder-only, `t5` = encoder-decoder) to its `AutoConfig.for_model` kwargs;
    the backbones a preset lists are the ones it runs by default.

    Example:
        >>> preset = PRESETS["cpu"]
        >>> preset.backbones, preset.new_tokens
        (('llama', 't5'), 16)
    """

    name: str
    vision: dict
    qformer: dict
    text: dict[str, dict]
    num_query_tokens: int = 32
    prompt_len: int = 24  # generate: text tokens after the Q image placeholders
    qformer_text_len: int = 24  # instruction tokens the Q-Former reads
    new_tokens: int = 16  # generate: min_new_tokens = max_new_tokens
    train_prompt_len: int = 48  # training: prompt + answer = the text tokens next to the Q queries
    train_answer_len: int = 16
    train_batch: int = 8
    batches: tuple[int, ...] = (1, 8)
    beams: tuple[int, ...] = (1, 5)
    warmup: int = 1
    reps: int = 5
    train_warmup: int = 2
    train_reps: int = 5
    dtype: str = "float32"
    device: str = "cpu"  # the device the preset is meant for
    threads: int | None = None  # torch.set_num_threads; None = torch's default

    @property
    def backbones(self) -> tuple[str, ...]:
        return tuple(self.text)


def _llama(hidden: int, intermediate: int, layers: int, heads: int, vocab: int, **extra) -> dict:
    return dict(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab, max_position_embeddings=2048,
                pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, **extra)


def _t5(d_model: int, d_ff: int, d_kv: int, layers: int, heads: int, vocab: int) -> dict:
    # Flan-T5: gated GELU FFN with exact gelu (LAVIS), untied LM head, decoder starts from pad = 0.
    return dict(d_model=d_model, d_ff=d_ff, d_kv=d_kv, num_layers=layers, num_decoder_layers=layers,
                num_heads=heads, vocab_size=vocab, feed_forward_proj="gated-gelu", dense_act_fn="gelu",
                tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)


def _vision(hidden: int, intermediate: int, layers: int, heads: int, image_size: int) -> dict:
    # initializer_range: the released config's 1e-10 would make every image look alike; speed does not care.
    return dict(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                num_attention_heads=heads, image_size=image_size, patch_size=14, initializer_range=0.02)


def _qformer(hidden: int, layers: int, heads: int, intermediate: int, vision_hidden: int) -> dict:
    return dict(vocab_size=30523, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                intermediate_size=intermediate, encoder_hidden_size=vision_hidden, cross_attention_frequency=2,
                max_position_embeddings=512)


# Real shapes: EVA ViT-g/14 at 224 px, BERT-base Q-Former, Vicuna-7B (LLaMA-7B + [PAD]) and Flan-T5-XL.
_VIT_G = _vision(1408, 6144, 39, 16, 224)
_QFORMER = _qformer(768, 12, 12, 3072, 1408)
PRESETS: dict[str, Preset] = {
    # Small enough for 2 CPU cores in < 2 min per script, with a real-size LLM vocabulary (LM-head cost matters).
    "cpu": Preset(
        name="cpu",
        vision=_vision(256, 1024, 2, 4, 112),
        qformer=_qformer(256, 4, 4, 1024, 256),
        text={"llama": _llama(256, 688, 4, 4, 32000), "t5": _t5(256, 688, 64, 4, 4, 32128)},
        new_tokens=16, reps=7, train_reps=7,
        # One thread: on a 2-core machine shared with other jobs, two OpenMP threads spin-wait whenever one is
        # descheduled (measured here: the generate script took 8 min instead of 1, with erratic figures).
        threads=1,
    ),
    # A few seconds: the smoke test's shape (same code path, trivial sizes).
    "smoke": Preset(
        name="smoke",
        vision=_vision(32, 64, 1, 2, 28),
        qformer=_qformer(32, 2, 2, 64, 32),
        text={"llama": _llama(32, 64, 1, 2, 512), "t5": _t5(32, 64, 16, 1, 2, 512)},
        num_query_tokens=4, prompt_len=4, qformer_text_len=4, new_tokens=3, train_prompt_len=6,
        train_answer_len=3, train_batch=2, batches=(1, 2), beams=(1, 2), warmup=1, reps=2, train_warmup=1,
        train_reps=2, threads=1,
    ),
    # One GPU, bf16, random weights: the shapes of gpu_anchor_figures.md (32 queries + 24 prompt tokens,
    # 64 new tokens; training: batch 8, 64 text tokens + 32 queries).
    "vicuna7b": Preset(
        name="vicuna7b",
        vision=_VIT_G,
        qformer=_QFORMER,
        text={"llama": _llama(4096, 11008, 32, 32, 32001, rms_norm_eps=1e-6)},
        new_tokens=64, warmup=2, reps=3, train_warmup=2, train_reps=3, dtype="bfloat16", device="cuda",
    ),
    "flant5xl": Preset(
        name="flant5xl",
        vision=_VIT_G,
        qformer=_QFORMER,
        text={"t5": _t5(2048, 5120, 64, 24, 32, 32128)},
        new_tokens=64, warmup=2, reps=3, train_warmup=2, train_reps=3, dtype="bfloat16", device="cuda",
    ),
}


def shrink(preset: Preset) -> Preset:
    """The same preset (backbones, dtype, lengths, vocabulary) at toy widths and depths, to test a GPU preset's
    code path on CPU. Repetitions drop to the minimum."""
    text = {}
    for backbone, kwargs in preset.text.items():
        small = (_llama(64, 128, 2, 4, kwargs["vocab_size"]) if backbone == "llama"
                 else _t5(64, 128, 16, 2, 4, kwargs["vocab_size"]))
        text[backbone] = small
    return replace(
        preset, name=f"{preset.name}-shrunk", vision=_vision(64, 128, 2, 4, 28), qformer=_qformer(64, 2, 4, 128, 64),
        text=text, new_tokens=3, prompt_len=4, qformer_text_len=4, train_prompt_len=6, train_answer_len=3,
        train_batch=2, batches=(1, 2), beams=(1, 2), warmup=1, reps=1, train_warmup=1, train_reps=1, threads=1,
    )


def resolve_preset(name: str, shrunk: bool = False) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"`--preset` must be one of {sorted(PRESETS)}, found {name!r}.")
    return shrink(PRESETS[name]) if shrunk else PRESETS[name]


def image_token_index(preset: Preset, backbone: str) -> int:
    """The image placeholder id: the last id of the LLM vocabulary (never drawn for prompt text)."""
    return preset.text[backbone]["vocab_size"] - 1


def config_kwargs(preset: Preset, backbone: str) -> dict:
    """Keyword arguments accepted by both our and transformers' `InstructBlipConfig`."""
    if backbone not in preset.text:
        raise ValueError(f"`backbone` must be one of {sorted(preset.text)} for preset {preset.name!r}, "
                         f"found {backbone!r}.")
    text_config = AutoConfig.for_model(backbone, **preset.text[backbone]).to_dict()
    return dict(vision_config=dict(preset.vision), qformer_config=dict(preset.qformer), text_config=text_config,
                num_query_tokens=preset.num_query_tokens, image_token_index=image_token_index(preset, backbone))


# --- models -------------------------------------------------------------------------------------------------
def build_one(side: str, preset: Preset, backbone: str, device: str, dtype: torch.dtype) -> torch.nn.Module:
    """One side alone, randomly initialised by its own `_init_weights`, created directly on `device` in `dtype`
    (no fp32 / CPU copy first). Used where only one model may be resident (peak-memory subprocesses)."""
    if side not in SIDES:
        raise ValueError(f"`side` must be one of {SIDES}, found {side!r}.")
    model_class, config_class = (OurModel, OurConfig) if side == "ours" else (TheirModel, TheirConfig)
    with torch.device(device):
        model = model_class._from_config(config_class(**config_kwargs(preset, backbone)), dtype=dtype)
    return model.eval()


def _clone_keeping_ties(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copy every tensor once: keys that alias one storage (tied embeddings) keep aliasing one copy."""
    copies: dict[tuple[int, tuple, tuple], torch.Tensor] = {}
    out = {}
    for key, tensor in state.items():
        alias = (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()))
        if alias not in copies:
            copies[alias] = tensor.detach().clone()
        out[key] = copies[alias]
    return out


def _copy_buffers(source: torch.nn.Module, target: torch.nn.Module) -> None:
    """Give `target` the values of `source`'s buffers of the same name and shape, non-persistent ones included
    (e.g. rotary `inv_freq`: computed on the CPU for ours, on `device` for theirs, they could differ in the last
    bit and flip a greedy token for reasons that have nothing to do with either model's code)."""
    theirs = dict(source.named_buffers())
    for name, buffer in target.named_buffers():
        if name in theirs and theirs[name].shape == buffer.shape:
            module_name, _, attribute = name.rpartition(".")
            target.get_submodule(module_name)._buffers[attribute] = theirs[name].detach().clone()


def build_pair(preset: Preset, backbone: str, device: str, dtype: torch.dtype, seed: int = 0) -> dict[str, Any]:
    """`{"ours": ..., "theirs": ...}` with identical weights, both in eval mode.

    transformers' model gets its own random init on `device`; ours is created with empty (meta) parameters
    (`accelerate.init_empty_weights`: cheap at 7B; buffers such as rotary frequencies stay real) and takes a
    copy of transformers' state dict, key for key (`strict=True`: any layout difference raises), and of its buffers.
    """
    torch.manual_seed(seed)
    theirs = build_one("theirs", preset, backbone, device, dtype)
    with init_empty_weights():
        ours = OurModel._from_config(OurConfig(**config_kwargs(preset, backbone)), dtype=dtype)
    ours.load_state_dict(_clone_keeping_ties(theirs.state_dict()), strict=True, assign=True)
    ours.to(device)
    _copy_buffers(theirs, ours)
    leftovers = [name for name, t in [*ours.named_parameters(), *ours.named_buffers()] if t.is_meta]
    if leftovers:
        raise RuntimeError(f"Our model kept meta tensors after loading transformers' weights: {leftovers[:5]}.")
    theirs_state = theirs.state_dict()
    for key, tensor in ours.state_dict().items():
        if tensor.dtype != theirs_state[key].dtype or tensor.device != theirs_state[key].device:
            raise RuntimeError(f"{key}: ours {tensor.dtype}/{tensor.device}, theirs "
                               f"{theirs_state[key].dtype}/{theirs_state[key].device}.")
    return {"ours": ours.eval(), "theirs": theirs}


def release(device: str) -> None:
    """Return freed memory: to the OS on CPU, from torch's cache on CUDA (so a subprocess can use it)."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    else:
        _malloc_trim()


# --- inputs -------------------------------------------------------------------------------------------------
def _text_ids(rows: int, length: int, vocab: int, gen: torch.Generator) -> torch.Tensor:
    # ids 0-3 are pad / bos / eos / unk and vocab - 1 is the image placeholder: draw neither.
    return torch.randint(4, vocab - 1, (rows, length), generator=gen)


def _image_and_instruction(preset: Preset, batch: int, dtype: torch.dtype, gen: torch.Generator) -> dict:
    size = preset.vision["image_size"]
    qformer_input_ids = torch.randint(1000, preset.qformer["vocab_size"] - 1, (batch, preset.qformer_text_len),
                                      generator=gen)
    return dict(pixel_values=torch.randn(batch, 3, size, size, generator=gen).to(dtype),
                qformer_input_ids=qformer_input_ids, qformer_attention_mask=torch.ones_like(qformer_input_ids))


def generate_inputs(preset: Preset, backbone: str, batch: int, device: str, dtype: torch.dtype,
                    seed: int = 0) -> dict[str, torch.Tensor]:
    """`[Q image placeholders][prompt_len text tokens]` per row (all rows full length: no padding)."""
    gen = torch.Generator().manual_seed(seed)
    vocab = preset.text[backbone]["vocab_size"]
    placeholders = torch.full((batch, preset.num_query_tokens), image_token_index(preset, backbone))
    input_ids = torch.cat([placeholders, _text_ids(batch, preset.prompt_len, vocab, gen)], dim=1)  # [B, Q + P]
    inputs = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                  **_image_and_instruction(preset, batch, dtype, gen))
    return {key: value.to(device) for key, value in inputs.items()}


def train_batch(preset: Preset, backbone: str, device: str, dtype: torch.dtype, seed: int = 0) -> dict:
    """A LAVIS-layout training batch of `preset.train_batch` rows, labels on the answer tokens only.

    Decoder-only: `[Q placeholders][prompt][answer]`, labels -100 on placeholders and prompt.
    T5: encoder `[Q placeholders][prompt]`, decoder labels = answer.
    """
    gen = torch.Generator().manual_seed(seed)
    batch, vocab = preset.train_batch, preset.text[backbone]["vocab_size"]
    placeholders = torch.full((batch, preset.num_query_tokens), image_token_index(preset, backbone))
    prompt = _text_ids(batch, preset.train_prompt_len, vocab, gen)
    answer = _text_ids(batch, preset.train_answer_len, vocab, gen)
    if backbone == "t5":
        input_ids, labels = torch.cat([placeholders, prompt], dim=1), answer  # [B, Q + P], [B, A]
    else:
        input_ids = torch.cat([placeholders, prompt, answer], dim=1)  # [B, Q + P + A]
        labels = torch.cat([torch.full((batch, input_ids.shape[1] - answer.shape[1]), -100), answer], dim=1)
    inputs = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=labels,
                  **_image_and_instruction(preset, batch, dtype, gen))
    return {key: value.to(device) for key, value in inputs.items()}


# --- timing -------------------------------------------------------------------------------------------------
def synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: str) -> tuple[float, Any]:
    """Wall seconds of `fn()` (device work included: synchronised before and after) and its result."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return time.perf_counter() - start, result


def time_alternating(calls: dict[Any, Callable[[], Any]], reps: int, warmup: int,
                     device: str) -> tuple[dict[Any, list[float]], dict[Any, Any]]:
    """Run every call `warmup` times untimed, then `reps` timed rounds that interleave the calls, reversing the
    order every other round so slow drift (thermal, a neighbour's load) hits every call alike.

    Returns the per-round times of each call and each call's result from the last round.
    """
    if reps < 1:
        raise ValueError(f"`reps` must be >= 1, found {reps}.")
    keys = list(calls)
    for _ in range(warmup):
        for key in keys:
            calls[key]()
    times: dict[Any, list[float]] = {key: [] for key in keys}
    last: dict[Any, Any] = {}
    for rep in range(reps):
        for key in keys if rep % 2 == 0 else keys[::-1]:
            seconds, last[key] = timed(calls[key], device)
            times[key].append(seconds)
    return times, last


def summary(values: list[float], scale: float = 1.0) -> dict[str, float]:
    """Median, min and max of `values` times `scale`, rounded for printing."""
    scaled = [value * scale for value in values]
    return {"median": round(statistics.median(scaled), 6), "min": round(min(scaled), 6),
            "max": round(max(scaled), 6)}


def figure(context: dict, metric: str, unit: str, ours: list[float], theirs: list[float],
           scale: float = 1.0) -> dict:
    """One comparable figure: both sides' summaries, the ratio of medians ours / theirs (`ratio`) and of minima
    (`ratio_min`: on a shared machine, the least disturbed repetition of each side)."""
    ours_s, theirs_s = summary(ours, scale), summary(theirs, scale)
    ratio = ours_s["median"] / theirs_s["median"] if theirs_s["median"] else float("nan")
    ratio_min = ours_s["min"] / theirs_s["min"] if theirs_s["min"] else float("nan")
    return {**context, "metric": metric, "unit": unit, "ours": ours_s, "theirs": theirs_s,
            "ratio": round(ratio, 4), "ratio_min": round(ratio_min, 4), "reps": len(ours)}


def emit(record: dict) -> None:
    """Print one JSON line (flushed, so a killed run keeps what it measured)."""
    print(json.dumps(record, sort_keys=False), flush=True)


# --- machine ------------------------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _source_revision() -> str:
    """The git commit of the `hf_instructblip` being measured (`+dirty` if its sources differ from it), or
    `unknown` outside a git checkout (read-only git commands)."""
    package_dir = os.path.dirname(hf_instructblip.__file__)
    try:
        commit = subprocess.run(["git", "-C", package_dir, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", package_dir, "status", "--porcelain", "--", "."], capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def environment(device: str) -> dict:
    """What produced the figures: command, machine, versions, and which `hf_instructblip` sources."""
    env = {"command": " ".join(["python", *sys.argv]), "nproc": os.cpu_count(), "cpu": _cpu_model(),
           "torch_threads": torch.get_num_threads(), "loadavg_1m": round(os.getloadavg()[0], 2),
           "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "hf_instructblip_path": os.path.dirname(hf_instructblip.__file__),
           "hf_instructblip_revision": _source_revision()}
    if torch.device(device).type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


# --- peak memory --------------------------------------------------------------------------------------------
@dataclass
class PeakMemory:
    """Peak memory of a code block relative to the state just before it (`with PeakMemory(device) as peak:`).

    CUDA: `torch.cuda.max_memory_allocated` minus the bytes allocated at entry (`total` = the peak itself,
    weights included). CPU: the process's resident-set high-water mark (`VmHWM`), reset at entry by writing 5 to
    `/proc/self/clear_refs`, minus the resident set at entry. Freed memory is returned to the OS first
    (`gc.collect`, `malloc_trim`) so memory already held by the allocator does not hide growth.

    Example:
        >>> with PeakMemory("cpu") as peak:
        ...     x = torch.ones(1 << 24)
        >>> peak.increase > 0
        True
    """

    device: str
    method: str = ""
    base: int = 0
    increase: int = 0
    total: int = 0

    def __enter__(self) -> "PeakMemory":
        gc.collect()
        if torch.device(self.device).type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.method = "torch.cuda.max_memory_allocated - memory_allocated at start"
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            _malloc_trim()
            with open("/proc/self/clear_refs", "w") as handle:  # resets VmHWM to the current RSS (Linux >= 4.0)
                handle.write("5")
            self.method = "VmHWM - VmRSS at start (HWM reset via /proc/self/clear_refs)"
            self.base = _proc_status_bytes("VmRSS")
        return self

    def __exit__(self, *exc) -> None:
        if torch.device(self.device).type == "cuda":
            torch.cuda.synchronize(self.device)
            self.total = torch.cuda.max_memory_allocated(self.device)
        else:
            self.total = _proc_status_bytes("VmHWM")
        self.increase = self.total - self.base


def warm_autograd_runtime(device: str) -> None:
    """One throwaway backward + AdamW step on a 4x4 layer: the autograd engine's threads and first-use buffers
    (~10 MiB RSS on CPU) then exist before a measurement starts, instead of being charged to whichever side runs."""
    layer = torch.nn.Linear(4, 4, device=device)
    optimizer = torch.optim.AdamW(layer.parameters())
    layer(torch.randn(2, 4, device=device)).sum().backward()
    optimizer.step()


def _proc_status_bytes(field_name: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError(f"/proc/self/status has no {field_name} line.")


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


# --- command line -------------------------------------------------------------------------------------------
def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--preset", default="cpu", help=f"one of {sorted(PRESETS)} (default: cpu)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda / cuda:N")
    parser.add_argument("--shrink", action="store_true",
                        help="run the preset's code path (dtype, backbones, vocab) at toy widths: a CPU test of a "
                             "GPU preset")
    parser.add_argument("--backbones", nargs="+", choices=BACKBONES, help="subset of the preset's backbones")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="override the preset's dtype")
    parser.add_argument("--reps", type=int, help="timed repetitions (override the preset)")
    parser.add_argument("--warmup", type=int, help="untimed warm-up calls (override the preset)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: the preset's, else torch's)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def setup(args: argparse.Namespace) -> tuple[Preset, torch.dtype, tuple[str, ...]]:
    """Validate the common arguments; returns the preset, dtype and backbones to run."""
    preset = resolve_preset(args.preset, args.shrink)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"`--device` {args.device!r} asks for CUDA, but torch sees no CUDA device.")
    if preset.device == "cuda" and torch.device(args.device).type != "cuda" and not args.shrink:
        raise ValueError(f"`--preset {preset.name}` is a real-shape GPU preset: pass `--device cuda`, or "
                         f"`--shrink` to run its code path at toy widths on {args.device!r}.")
    backbones = tuple(args.backbones or preset.backbones)
    unknown = [b for b in backbones if b not in preset.text]
    if unknown:
        raise ValueError(f"`--backbones`: preset {preset.name!r} has {list(preset.text)}, found {unknown}.")
    threads = args.threads or preset.threads
    if threads:
        torch.set_num_threads(threads)
    dtype = DTYPES[args.dtype or preset.dtype]
    return preset, dtype, backbones


def preset_record(preset: Preset) -> dict:
    return {key: value for key, value in asdict(preset).items() if key not in ("vision", "qformer", "text")}
