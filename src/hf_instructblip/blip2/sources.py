"""Reading the sources of a BLIP-2 start into our key layout: a BLIP-2 (transformers folder / Hub id, or a LAVIS
`.pth`), the Q-Former's text side (BERT or a stage-1 BLIP-2) and the LLM.

Nothing reads weights before the source's config has been checked; a transformers BLIP-2 folder is read tensor
by tensor from its safetensors files, skipping its LLM, and a Hub id downloads only the shards holding the rest.

Example:
    >>> blip2 = read_blip2("Salesforce/blip2-flan-t5-xl")
    >>> blip2.tensors["query_tokens"].shape, blip2.has_text_side
    (torch.Size([1, 32, 768]), False)
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel

from ..conversion.checkpoint_io import load_state_dict_file
from ..conversion.lavis_keys import DROPS as LAVIS_DROPS
from ..conversion.lavis_mapping import compose_lavis_state_dict, fuse_qv_bias, rename
from ..model.configuration import InstructBlipQFormerConfig, InstructBlipVisionConfig
from .keys import (
    BERT_TEXT_DROPS,
    BERT_TEXT_RENAMES,
    HF_BLIP2_DROPS,
    HF_BLIP2_RENAMES,
    LAVIS_BLIP2_DROPS,
    is_text_side,
    layer_indices,
    map_key,
)

BLIP2_MODEL_TYPE = "blip-2"
LAVIS_SUFFIXES = (".pth", ".pt", ".bin")
EVA_HEAD_DIM = 88  # EVA ViT-g: 1408 / 16 heads; a LAVIS .pth has no config, and weights do not tell head counts
BERT_HEAD_DIM = 64  # BERT-base: 768 / 12 heads
EVA_G_DEPTH = 39  # blocks of BLIP-2's ViT: eva_vit_g.pth's 40 without the last
_VIT_BLOCK = re.compile(r"visual_encoder\.blocks\.(\d+)\.")
_QV_BIAS = re.compile(r"visual_encoder\.blocks\.(\d+)\.attn\.([qv])_bias")


@dataclass
class SourceWeights:
    """One source's tensors in our layout, where each came from, and what was left out and why."""

    role: str  # the argument it came from: "blip2" or "qformer_text"
    description: str
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # our key -> tensor
    origin: dict[str, str] = field(default_factory=dict)  # our key -> source key(s)
    dropped: dict[str, str] = field(default_factory=dict)  # source key -> reason
    config: dict[str, Any] = field(default_factory=dict)  # vision_config / qformer_config / num_query_tokens
    folder: Path | None = None  # where tokenizer / image processor files may be

    @property
    def has_text_side(self) -> bool:
        return any(is_text_side(key) for key in self.tensors)


def known_fields(config_class: type, values: dict[str, Any]) -> dict[str, Any]:
    """The entries of `values` that `config_class` declares (BLIP-2-only settings are left out)."""
    return {key: value for key, value in values.items() if key in config_class.__annotations__}


# --- BLIP-2 --------------------------------------------------------------------------------------------
def read_blip2(source: str | Path, role: str = "blip2", blip2_config: Any = None, vit: str | None = None
               ) -> SourceWeights:
    """A transformers BLIP-2 folder / Hub id, or a LAVIS BLIP-2 `.pth` (safe loading), in our layout.

    `blip2_config` (LAVIS only: a `.pth` holds no config) gives the settings weights cannot tell (head counts):
    a BLIP-2 config, its dict, or a folder / id holding one; default: EVA ViT-g's and BERT-base's head widths.
    `vit` (LAVIS only): EVA ViT-g weights (`eva_vit_g.pth`) for a checkpoint saved without its frozen ViT.
    """
    if not isinstance(source, (str, Path)):
        raise TypeError(f"`{role}`: expected a BLIP-2 folder, Hub id or LAVIS .pth path, found {type(source).__name__}.")
    if str(source).endswith(LAVIS_SUFFIXES):
        return _read_lavis(Path(source), role, blip2_config, vit)
    return _read_transformers(str(source), role)


def _auto_config(source: str, role: str) -> PretrainedConfig:
    try:
        return AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise ValueError(f"`{role}`: expected a folder or Hub id with a transformers config.json, found none at "
                         f"{source!r} ({type(err).__name__}: {str(err).splitlines()[0]}).") from None


def _read_transformers(source: str, role: str) -> SourceWeights:
    config = _auto_config(source, role)
    if config.model_type != BLIP2_MODEL_TYPE:
        raise ValueError(
            f"`{role}`: expected a BLIP-2 checkpoint (model_type 'blip-2': Blip2ForConditionalGeneration, Blip2Model "
            f"or Blip2ForImageTextRetrieval) or a LAVIS BLIP-2 .pth, found model_type {config.model_type!r} at "
            f"{source!r}.")
    folder = _resolve_folder(source)
    result = SourceWeights(role, f"transformers BLIP-2 {source} ({', '.join(config.architectures or ['?'])})",
                           folder=folder)
    result.config = {
        "vision_config": known_fields(InstructBlipVisionConfig, config.vision_config.to_dict()),
        "qformer_config": known_fields(InstructBlipQFormerConfig, config.qformer_config.to_dict()),
        "num_query_tokens": config.num_query_tokens,
    }
    for file, keys in _weight_files(folder, role).items():
        wanted = {}
        for key in keys:
            ours, reason = map_key(key, HF_BLIP2_RENAMES, HF_BLIP2_DROPS)
            if reason is not None:
                result.dropped[key] = reason
            elif ours is None:
                raise ValueError(f"`{role}`: {source} holds {key!r}, which no BLIP-2 rule maps; is it a BLIP-2 "
                                 f"checkpoint of a transformers version this package knows?")
            else:
                wanted[key] = ours
        for key, tensor in _read_tensors(folder / file, wanted, role).items():
            result.tensors[wanted[key]], result.origin[wanted[key]] = tensor, key
    return result


def _resolve_folder(source: str) -> Path:
    """A local folder as is; a Hub id: its small files, then only the weight shards that hold non-LLM keys."""
    if Path(source).is_dir():
        return Path(source)
    from huggingface_hub import snapshot_download

    folder = Path(snapshot_download(source, allow_patterns=["*.json", "*.txt", "*.model"]))
    index = folder / "model.safetensors.index.json"
    shards = ["model.safetensors"]
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted({file for key, file in weight_map.items()
                         if map_key(key, HF_BLIP2_RENAMES, HF_BLIP2_DROPS)[1] is None})
    return Path(snapshot_download(source, allow_patterns=["*.json", "*.txt", "*.model", *shards]))


def _weight_files(folder: Path, role: str) -> dict[str, list[str]]:
    """safetensors file -> the keys it holds (from the index when sharded)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files: dict[str, list[str]] = {}
        for key, file in json.loads(index.read_text())["weight_map"].items():
            files.setdefault(file, []).append(key)
        return files
    single = folder / "model.safetensors"
    if not single.is_file():
        raise ValueError(f"`{role}`: expected safetensors weights (model.safetensors or an index) in {folder}, "
                         f"found {sorted(p.name for p in folder.iterdir())}.")
    with safe_open(single, framework="pt") as handle:
        return {single.name: list(handle.keys())}


def _read_tensors(path: Path, keys: dict[str, str], role: str) -> dict[str, torch.Tensor]:
    if not keys:
        return {}
    try:
        with safe_open(path, framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in keys}
    except Exception as err:  # safetensors raises its own error types
        raise ValueError(f"`{role}`: {path} is not a readable safetensors file: {err}") from None


def _read_lavis(path: Path, role: str, blip2_config: Any, vit: str | None) -> SourceWeights:
    state = load_state_dict_file(path, f"`{role}`")
    dropped = {}
    if vit is not None:
        state = compose_lavis_state_dict(state, load_state_dict_file(vit, "`vit`"), {}, decoder_only=True)
        # eva_vit_g.pth has 40 blocks; BLIP-2 builds 39 (LAVIS drops the last one), unless the config says otherwise.
        depth = _config_dict(blip2_config, role).get("vision_config", {}).get("num_hidden_layers", EVA_G_DEPTH)
        for key in [k for k in state if (m := _VIT_BLOCK.match(k)) and int(m.group(1)) >= depth]:
            del state[key]
            dropped[key] = f"EVA block beyond the vision encoder's {depth} (BLIP-2 uses the ViT without its last block)"
    if not any(key.startswith("Qformer.") for key in state):
        raise ValueError(f"`{role}`: {path} holds no Q-Former (no 'Qformer.*' keys): not a LAVIS BLIP-2 checkpoint. "
                         f"Top-level keys: {sorted({k.split('.')[0] for k in state})[:10]}.")
    if not any(key.startswith("visual_encoder.") for key in state):
        raise ValueError(f"`{role}`: {path} holds no EVA ViT weights ('visual_encoder.*'; LAVIS saves checkpoints "
                         f"without frozen parameters): pass `vit` (eva_vit_g.pth) as well.")
    result = SourceWeights(role, f"LAVIS BLIP-2 {path.name}", folder=None)
    result.dropped.update(dropped)
    qv: dict[int, dict[str, str]] = {}
    for key, tensor in state.items():
        _, reason = map_key(key, (), LAVIS_BLIP2_DROPS + LAVIS_DROPS)
        if reason is not None:
            result.dropped[key] = reason
        elif match := _QV_BIAS.fullmatch(key):
            qv.setdefault(int(match.group(1)), {})[match.group(2)] = key
        elif (ours := rename(key)) is None or ours.startswith("language_model."):
            raise ValueError(f"`{role}`: {path} holds {key!r}, which no LAVIS BLIP-2 rule maps.")
        else:
            result.tensors[ours], result.origin[ours] = tensor, key
    for layer, parts in sorted(qv.items()):
        if set(parts) != {"q", "v"}:
            raise ValueError(f"`{role}`: EVA block {layer} has only {sorted(parts)} of its q_bias / v_bias.")
        ours = f"vision_model.encoder.layers.{layer}.self_attn.qkv.bias"
        result.tensors[ours] = fuse_qv_bias(state[parts["q"]], state[parts["v"]])  # [3 * D]: (q, 0, v)
        result.origin[ours] = f"{parts['q']} + zeros + {parts['v']}"
    result.config = _lavis_config(result.tensors, blip2_config, role)
    return result


def _lavis_config(tensors: dict[str, torch.Tensor], blip2_config: Any, role: str) -> dict[str, Any]:
    """Vision / Q-Former settings read from the weights' shapes, overridden by `blip2_config` where given."""
    patch = tensors["vision_model.embeddings.patch_embedding.weight"].shape[-1]
    width = tensors["vision_model.embeddings.class_embedding"].shape[-1]
    vision = dict(hidden_size=width, num_hidden_layers=len(layer_indices(tensors, "vision_model.encoder.layers")),
                  intermediate_size=tensors["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
                  patch_size=patch, num_attention_heads=_heads(width, EVA_HEAD_DIM),
                  image_size=math.isqrt(tensors["vision_model.embeddings.position_embedding"].shape[1] - 1) * patch)
    hidden = tensors["query_tokens"].shape[-1]
    cross = layer_indices([k for k in tensors if ".crossattention." in k], "qformer.encoder.layer")
    layers = len(layer_indices(tensors, "qformer.encoder.layer"))
    qformer = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=_heads(hidden, BERT_HEAD_DIM),
                   intermediate_size=tensors["qformer.encoder.layer.0.intermediate_query.dense.weight"].shape[0],
                   cross_attention_frequency=cross[1] - cross[0] if len(cross) > 1 else layers)
    if "qformer.embeddings.word_embeddings.weight" in tensors:
        qformer["vocab_size"] = tensors["qformer.embeddings.word_embeddings.weight"].shape[0]
        qformer["max_position_embeddings"] = tensors["qformer.embeddings.position_embeddings.weight"].shape[0]
    given = _config_dict(blip2_config, role)
    vision.update(known_fields(InstructBlipVisionConfig, given.get("vision_config", {})))
    qformer.update(known_fields(InstructBlipQFormerConfig, given.get("qformer_config", {})))
    for name, part in (("vision_config", vision), ("qformer_config", qformer)):
        if part["num_attention_heads"] is None:  # the weights do not tell head counts
            raise ValueError(f"`blip2_config`: the LAVIS `{role}` is {part['hidden_size']} wide, which is not "
                             f"EVA-g's / BERT-base's head width times a head count; give {name}.num_attention_heads.")
    return {"vision_config": vision, "qformer_config": qformer, "num_query_tokens": tensors["query_tokens"].shape[1]}


def _heads(width: int, head_dim: int) -> int | None:
    """EVA-g's / BERT-base's head count for `width`, or None when `width` is not a multiple of their head width."""
    return width // head_dim if width % head_dim == 0 else None


def _config_dict(config: Any, role: str) -> dict[str, Any]:
    if config is None:
        return {}
    if isinstance(config, (str, Path)):
        config = _auto_config(str(config), "blip2_config")
    if isinstance(config, PretrainedConfig):
        config = config.to_dict()
    if not isinstance(config, dict):
        raise TypeError(f"`blip2_config` (for the LAVIS `{role}`): expected a BLIP-2 config, dict or path, found "
                        f"{type(config).__name__}.")
    return {name: sub.to_dict() if isinstance(sub, PretrainedConfig) else dict(sub or {})
            for name, sub in config.items() if name in ("vision_config", "qformer_config")}


# --- the Q-Former's text side ---------------------------------------------------------------------------
def read_text_side(source: Any, qformer_config: dict[str, Any], role: str = "qformer_text") -> SourceWeights:
    """Word / position embeddings and each layer's text feed-forward from a BERT (folder, id or model; with or
    without the `bert.` prefix) or a stage-1 BLIP-2, checked against the Q-Former's width and depth first."""
    if isinstance(source, PreTrainedModel):
        config = source.config
    elif isinstance(source, (str, Path)) and str(source).endswith(LAVIS_SUFFIXES):
        return _text_only(read_blip2(source, role), role, qformer_config)
    elif isinstance(source, (str, Path)):
        config = _auto_config(str(source), role)
    else:
        raise TypeError(f"`{role}`: expected a BERT or stage-1 BLIP-2 (folder, Hub id, .pth or model), found "
                        f"{type(source).__name__}.")
    if config.model_type == BLIP2_MODEL_TYPE:
        if isinstance(source, PreTrainedModel):
            raise TypeError(f"`{role}`: pass a stage-1 BLIP-2 as a folder or Hub id, not a built model.")
        check_fits(role, config.qformer_config.to_dict(), qformer_config)
        return _text_only(read_blip2(str(source), role), role, qformer_config)
    check_fits(role, config.to_dict(), qformer_config)
    return _read_bert(source, role)


def check_fits(role: str, found: dict[str, Any], qformer: dict[str, Any]) -> None:
    """The text side's width, depth and feed-forward width must be the Q-Former's (tensor i goes to layer i)."""
    names = ("hidden_size", "num_hidden_layers", "intermediate_size")
    wrong = {name: found.get(name) for name in names if found.get(name) != qformer[name]}
    if wrong:
        raise ValueError(f"`{role}`: its text side must match the BLIP-2 Q-Former ({ {n: qformer[n] for n in names} }), "
                         f"found {wrong}; pass a BERT of the Q-Former's size (LAVIS: bert-base-uncased).")


def _text_only(source: SourceWeights, role: str, qformer_config: dict[str, Any]) -> SourceWeights:
    if not source.has_text_side:
        raise ValueError(f"`{role}`: {source.description} is a stage-2 BLIP-2 without the Q-Former's text side; pass a "
                         f"BERT (e.g. 'bert-base-uncased') or a stage-1 BLIP-2 (e.g. 'Salesforce/blip2-itm-vit-g').")
    check_fits(role, source.config["qformer_config"], qformer_config)
    text = SourceWeights(role, f"{source.description} (text side)", folder=source.folder, dropped=source.dropped)
    for key, tensor in source.tensors.items():
        if is_text_side(key):
            text.tensors[key], text.origin[key] = tensor, source.origin[key]
        else:
            text.dropped[source.origin[key]] = "not the text side: taken from `blip2`"
    return text


def _read_bert(source: Any, role: str) -> SourceWeights:
    if isinstance(source, PreTrainedModel):
        model, missing, folder = source.base_model, set(), None  # BertForMaskedLM.base_model: no `bert.` prefix
    else:
        model, info = AutoModel.from_pretrained(str(source), output_loading_info=True)
        missing, folder = set(info["missing_keys"]), Path(model.name_or_path)
    result = SourceWeights(role, f"{type(model).__name__} {getattr(model, 'name_or_path', '') or '(built)'}",
                           folder=folder if folder and folder.is_dir() else None)
    for key, tensor in model.state_dict().items():
        ours, reason = map_key(key, BERT_TEXT_RENAMES, BERT_TEXT_DROPS)
        if ours is None:
            result.dropped[key] = reason or "not used by the Q-Former"
            continue
        if key in missing:  # transformers initialised it at random: refuse, never pass noise on as BERT's
            raise ValueError(f"`{role}`: {source} has no {key!r} (transformers would initialise it at random).")
        result.tensors[ours], result.origin[ours] = tensor.detach(), key
    return result
