"""LAVIS InstructBLIP state dict -> Hugging Face InstructBLIP state dict: a pure, table-driven function.

Accounting is complete: every source key is consumed by exactly one rule or dropped with a stated reason,
every target key is produced, every shape is checked, and any gap stops the conversion with the list of keys.

The only value transforms (everything else is the source tensor itself, renamed):
- EVA `attn.q_bias` + `attn.v_bias` -> fused `self_attn.qkv.bias = cat(q_bias, zeros, v_bias)` (k has no bias);
- vocabulary rows the target has and the source lacks (Vicuna's "[PAD]" when the LLM comes from an HF folder,
  the "<image>" placeholder) are appended to the LLM embedding / LM head as the mean of the source rows;
- a key tied in the target model (T5 `encoder.embed_tokens` -> `shared`) that the source lacks (an HF LLM
  folder saves tied weights once) is filled with the tensor of its tie partner.

Example:
    >>> spec = TargetSpec.from_model(model)            # e.g. built on the meta device
    >>> result = convert_state_dict(lavis_state_dict, spec)
    >>> model.load_state_dict(result.state_dict, strict=True, assign=True)
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.utils.logging import tqdm  # honours transformers' disable_progress_bar()

from .lavis_keys import DROPS, RENAMES

_QV_BIAS = re.compile(r"visual_encoder\.blocks\.(\d+)\.attn\.([qv])_bias")
_VIT_BLOCK = re.compile(r"visual_encoder\.blocks\.(\d+)\..+")
_VISION_LAYER = re.compile(r"vision_model\.encoder\.layers\.(\d+)\..+")
_COMPILED_RENAMES = tuple((re.compile(p), t) for p, t in RENAMES)
_COMPILED_DROPS = tuple((re.compile(p), r) for p, r in DROPS)


class ConversionError(ValueError):
    """The source state dict does not convert cleanly; the message lists every offending key."""


@dataclass(frozen=True)
class TargetSpec:
    """What the HF model expects: key -> shape, tied aliases, and which keys hold LLM vocabulary rows.

    Example:
        >>> with torch.device("meta"):
        ...     spec = TargetSpec.from_model(InstructBlipForConditionalGeneration(config))
    """

    shapes: dict[str, tuple[int, ...]]
    tied: dict[str, str] = field(default_factory=dict)  # alias key -> canonical key (one shared parameter)
    vocab_keys: frozenset[str] = frozenset()  # LLM input / output embedding weights (rows = tokens)

    @classmethod
    def from_model(cls, model: nn.Module) -> TargetSpec:
        shapes = {key: tuple(value.shape) for key, value in model.state_dict().items()}
        canonical: dict[int, str] = {}
        tied: dict[str, str] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            first = canonical.setdefault(id(param), name)
            if first != name:
                tied[name] = first
        embeddings = {id(m.weight) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m}
        vocab = frozenset(
            name for name, p in model.named_parameters(remove_duplicate=False) if id(p) in embeddings
        )
        return cls(shapes=shapes, tied=tied, vocab_keys=vocab)

    @property
    def vision_depth(self) -> int:
        layers = {int(m.group(1)) for key in self.shapes if (m := _VISION_LAYER.fullmatch(key))}
        return max(layers) + 1 if layers else 0


@dataclass
class MappingResult:
    """The converted state dict and its accounting (`problems` empty means a clean conversion)."""

    state_dict: dict[str, torch.Tensor]
    sources: dict[str, tuple[str, ...]]  # target key -> the source key(s) it was made from
    dropped: dict[str, str]  # source key -> reason
    transforms: list[str]  # human-readable notes on every non-identity value transform
    unmapped: list[str]  # source keys that no rule accepts
    unexpected: list[str]  # "source -> target" where the target model has no such key
    missing: list[str]  # target keys not produced
    shape_errors: list[str]
    duplicates: list[str]  # target keys produced by more than one source key

    @property
    def problems(self) -> dict[str, list[str]]:
        found = {
            "unexpected source keys (no conversion rule)": self.unmapped,
            "source keys mapped to keys the target model lacks": self.unexpected,
            "target keys missing from the source": self.missing,
            "wrong shapes": self.shape_errors,
            "target keys produced more than once": self.duplicates,
        }
        return {title: keys for title, keys in found.items() if keys}

    def summary(self) -> str:
        """The key accounting, as `--dry-run` prints it."""
        lines = [
            f"source keys consumed: {sum(len(s) for s in self.sources.values())}",
            f"source keys dropped:  {len(self.dropped)}",
            f"target keys produced: {len(self.state_dict)}",
        ]
        reasons: dict[str, int] = defaultdict(int)
        for reason in self.dropped.values():
            reasons[reason] += 1
        lines += [f"  dropped {n} x {reason}" for reason, n in reasons.items()]
        lines += [f"  transform: {note}" for note in self.transforms]
        for title, keys in self.problems.items():
            lines.append(f"PROBLEM {title} ({len(keys)}):")
            lines += [f"  {key}" for key in keys]
        return "\n".join(lines)


def drop_reason(key: str, target: TargetSpec) -> str | None:
    """Why `key` is deliberately not converted, or None."""
    for pattern, reason in _COMPILED_DROPS:
        if pattern.fullmatch(key):
            return reason
    block = _VIT_BLOCK.fullmatch(key)
    if block and int(block.group(1)) >= target.vision_depth:
        # EVA-CLIP-g has 40 blocks; BLIP-2/InstructBLIP build 39 (the last layer's input is the feature)
        # and LAVIS loads eva_vit_g.pth with strict=False, silently skipping the rest.
        return f"EVA block beyond the {target.vision_depth} blocks InstructBLIP uses (LAVIS drops it too)"
    return None


def rename(key: str) -> str | None:
    """The HF key for LAVIS `key` (pure renames only), or None if no rule applies."""
    for pattern, template in _COMPILED_RENAMES:
        match = pattern.fullmatch(key)
        if match:
            return match.expand(template)
    return None


def fuse_qv_bias(q_bias: torch.Tensor, v_bias: torch.Tensor) -> torch.Tensor:
    """EVA's separate q/v biases -> the fused qkv bias `[3 * D]`; the key bias is zero (EVA has none)."""
    return torch.cat([q_bias, torch.zeros_like(q_bias), v_bias])


def append_vocab_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """`weight` `[V, D]` with `rows` new rows, each the mean of the existing rows (deterministic, in-distribution)."""
    mean = weight.float().mean(dim=0, keepdim=True).to(weight.dtype)  # [1, D]
    return torch.cat([weight, mean.expand(rows, -1)])


def convert_state_dict(
    source: Mapping[str, torch.Tensor], target: TargetSpec, strict: bool = True, progress: bool = False
) -> MappingResult:
    """Convert a LAVIS-layout `source` to the HF layout described by `target`.

    `strict=True` raises `ConversionError` listing every problem; `strict=False` returns them in the result
    (for `--dry-run`). Tensors are not copied except where a transform builds a new one.
    """
    result = MappingResult({}, {}, {}, [], [], [], [], [], [])
    qv_parts: dict[int, dict[str, str]] = defaultdict(dict)
    for key in tqdm(sorted(source), desc="mapping keys", disable=not progress):
        if (reason := drop_reason(key, target)) is not None:
            result.dropped[key] = reason
        elif match := _QV_BIAS.fullmatch(key):
            qv_parts[int(match.group(1))][match.group(2)] = key
        elif (new_key := rename(key)) is None:
            result.unmapped.append(key)
        else:
            _produce(result, target, new_key, (key,), source[key])
    _fuse_qv_biases(result, target, source, qv_parts)
    _fill_tied(result, target)
    _extend_vocab(result, target)
    result.missing += sorted(set(target.shapes) - set(result.state_dict))
    result.shape_errors = [
        _shape_message(key, result, target)
        for key, value in result.state_dict.items()
        if tuple(value.shape) != target.shapes[key]
    ]
    if strict and result.problems:
        raise ConversionError(format_problems(result.problems))
    return result


def format_problems(problems: dict[str, list[str]], limit: int = 50) -> str:
    lines = ["The LAVIS state dict does not match the target InstructBLIP model:"]
    for title, keys in problems.items():
        lines.append(f"- {title} ({len(keys)}):")
        lines += [f"    {key}" for key in keys[:limit]]
        if len(keys) > limit:
            lines.append(f"    ... and {len(keys) - limit} more")
    return "\n".join(lines)


def _produce(
    result: MappingResult, target: TargetSpec, new_key: str, source_keys: tuple[str, ...], value: torch.Tensor
) -> None:
    if new_key not in target.shapes:
        result.unexpected.append(f"{' + '.join(source_keys)} -> {new_key}")
    elif new_key in result.state_dict:
        result.duplicates.append(f"{new_key} <- {' and '.join(result.sources[new_key] + source_keys)}")
    else:
        result.state_dict[new_key] = value
        result.sources[new_key] = source_keys


def _fuse_qv_biases(
    result: MappingResult, target: TargetSpec, source: Mapping[str, torch.Tensor], parts: dict[int, dict[str, str]]
) -> None:
    for layer, keys in sorted(parts.items()):
        if set(keys) != {"q", "v"}:
            partner = "v_bias" if "q" in keys else "q_bias"
            given = next(iter(keys.values()))
            result.missing.append(f"visual_encoder.blocks.{layer}.attn.{partner} (needed with {given})")
            continue
        new_key = f"vision_model.encoder.layers.{layer}.self_attn.qkv.bias"
        q_bias, v_bias = source[keys["q"]], source[keys["v"]]
        if q_bias.shape != v_bias.shape:
            result.shape_errors.append(f"{keys['q']} {list(q_bias.shape)} and {keys['v']} {list(v_bias.shape)} differ")
            continue
        _produce(result, target, new_key, (keys["q"], keys["v"]), fuse_qv_bias(q_bias, v_bias))
    if parts:
        result.transforms.append(f"fused q_bias/v_bias into qkv.bias (zero key bias) in {len(parts)} EVA layers")


def _fill_tied(result: MappingResult, target: TargetSpec) -> None:
    """Fill tied keys the source lacks from a given member of their group.

    Given members are kept as they are: transformers ties e.g. T5's `lm_head` to `shared` only when a
    checkpoint lacks it, and Flan-T5 (as LAVIS loads it) has its own LM head.
    """
    groups: dict[str, list[str]] = defaultdict(list)
    for alias, canonical in target.tied.items():
        groups[canonical].append(alias)
    for canonical, aliases in groups.items():
        members = [canonical, *aliases]
        given = [key for key in members if key in result.state_dict]
        if not given:
            continue  # reported as missing
        for key in members:
            if key not in result.state_dict:
                result.state_dict[key] = result.state_dict[given[0]]
                result.sources[key] = ()
                result.transforms.append(f"{key}: tied to {given[0]} (absent from the source)")


def _extend_vocab(result: MappingResult, target: TargetSpec) -> None:
    """Append the vocabulary rows the target adds ([PAD], <image>) to the LLM embedding / LM head."""
    extended: dict[int, torch.Tensor] = {}  # id(source tensor) -> extended tensor, so tied keys stay shared
    for key in sorted(target.vocab_keys & set(result.state_dict)):
        value, expected = result.state_dict[key], target.shapes[key]
        rows = expected[0] - value.shape[0]
        if value.dim() != 2 or rows <= 0 or tuple(value.shape[1:]) != expected[1:]:
            continue
        if id(value) not in extended:
            extended[id(value)] = append_vocab_rows(value, rows)
        result.state_dict[key] = extended[id(value)]
        result.transforms.append(
            f"{key}: appended rows {value.shape[0]}..{expected[0] - 1} (mean of the {value.shape[0]} source rows)"
        )


def _shape_message(key: str, result: MappingResult, target: TargetSpec) -> str:
    found = list(result.state_dict[key].shape)
    origin = " + ".join(result.sources.get(key, ())) or "tied"
    message = f"{key} (from {origin}): expected {list(target.shapes[key])}, found {found}"
    if key == "qformer.embeddings.word_embeddings.weight":
        message += " (the released Q-Former vocabulary is bert-base-uncased + [DEC] = 30523 rows)"
    return message


# --- composing the released pieces into one LAVIS-layout state dict --------------------------------------
VIT_PREFIX = "visual_encoder."


def lavis_llm_prefix(decoder_only: bool) -> str:
    """LAVIS's attribute name for the LLM: `llm_model` (Vicuna) or `t5_model` (Flan-T5)."""
    return "llm_model." if decoder_only else "t5_model."


def compose_lavis_state_dict(
    trimmed: Mapping[str, torch.Tensor],
    vit: Mapping[str, torch.Tensor],
    llm: Mapping[str, torch.Tensor],
    decoder_only: bool,
) -> dict[str, torch.Tensor]:
    """Trimmed InstructBLIP checkpoint + EVA ViT-g weights + HF LLM weights -> one full LAVIS-layout dict.

    The ViT file's keys (`blocks.0...`, as in `eva_vit_g.pth`) get the `visual_encoder.` prefix and the LLM's
    keys its LAVIS prefix; a key given by two pieces is an error (each source key is consumed exactly once).
    """
    llm_prefix = lavis_llm_prefix(decoder_only)
    pieces = {
        "trimmed checkpoint": dict(trimmed),
        "ViT weights": {k if k.startswith(VIT_PREFIX) else VIT_PREFIX + k: v for k, v in vit.items()},
        "LLM weights": {llm_prefix + k: v for k, v in llm.items()},
    }
    composed: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    clashes = []
    for name, piece in pieces.items():
        for key, value in piece.items():
            if key in composed:
                clashes.append(f"{key} (in the {origin[key]} and the {name})")
            composed[key], origin[key] = value, name
    if clashes:
        raise ConversionError(format_problems({"keys given by more than one input": clashes}))
    return composed


def detect_layout(state_dict: Mapping[str, torch.Tensor]) -> str:
    """'full' (ViT + Q-Former + LLM), 'trimmed' (Q-Former side only) or 'unknown', sniffed from marker keys."""
    has = {prefix: any(k.startswith(prefix) for k in state_dict)
           for prefix in ("visual_encoder.", "Qformer.", "t5_model.", "llm_model.")}
    if has["visual_encoder."] and has["Qformer."] and (has["t5_model."] or has["llm_model."]):
        return "full"
    if has["Qformer."] and not has["visual_encoder."]:
        return "trimmed"
    return "unknown"
