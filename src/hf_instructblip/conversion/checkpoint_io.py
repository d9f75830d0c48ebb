"""Safe loading of conversion inputs: LAVIS `.pth` files, EVA ViT weights and Hugging Face LLM folders.

`.pth` / `.bin` files go through `torch.load(weights_only=True)` only (a pickle that would run code is refused)
and are memory-mapped when they use the zip format, so a 13B checkpoint is not read into RAM up front (its bytes
are read when the conversion casts and saves the tensors).

Progress (stderr, transformers' tqdm: `transformers.utils.logging.disable_progress_bar()` or
`HF_HUB_DISABLE_PROGRESS_BARS=1` hides it): `.safetensors` files are read tensor by tensor under a bar, and an LLM
folder file by file.
"""

from __future__ import annotations

import pickle
import pickletools
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, PretrainedConfig
from transformers.utils.logging import tqdm

LLM_WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")


def load_torch_file(path: str | Path, what: str) -> object:
    """`torch.load(path, weights_only=True, mmap=...)` with clear refusals for unsafe or broken files.

    `what` names the argument the file came from (e.g. "--checkpoint"), for the error messages.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{what}: expected an existing file, found no file at {path}.")
    # mmap needs the zip format (torch >= 1.6); older files are read normally.
    mmap = zipfile.is_zipfile(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        refused_global = "GLOBAL" in str(err)
        # A plain `pickle.dump` (protocol 4+) is refused for its framing opcode before any GLOBAL is read, as a
        # broken stream would be: tell them apart by reading its opcodes (pickletools runs nothing).
        if not refused_global and not _pickle_references_code(path):
            raise _unreadable(path, what, _detail(err, "Unsupported")) from None
        raise ValueError(
            f"{what}: refusing to load {path}: it is not a plain tensor checkpoint (its pickle references code or "
            f"objects that `torch.load(weights_only=True)` does not allow; loading it could run that code). "
            f"Details: {_detail(err, 'GLOBAL' if refused_global else 'Unsupported')}"
        ) from None
    except Exception as err:  # empty, truncated or not a checkpoint at all: EOFError, KeyError, RuntimeError, ...
        raise _unreadable(path, what, _detail(err)) from None


_CODE_OPCODES = frozenset({"GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "REDUCE", "NEWOBJ", "NEWOBJ_EX", "BUILD"})


def _pickle_references_code(path: Path) -> bool:
    """Whether `path` starts with a well-formed pickle that imports or calls objects."""
    try:
        with path.open("rb") as file:
            return any(opcode.name in _CODE_OPCODES for opcode, _, _ in pickletools.genops(file))
    except Exception:  # not a well-formed pickle: a broken file
        return False


def _unreadable(path: Path, what: str, detail: str) -> ValueError:
    return ValueError(
        f"{what}: {path} is not a readable PyTorch checkpoint (empty, truncated or corrupt; re-download it or pass "
        f"the right file). Details: {detail}"
    )


def _detail(err: Exception, marker: str = "") -> str:
    """The first line of `err` containing `marker`, or its type name (some torch errors have no message)."""
    lines = [line.strip() for line in str(err).splitlines() if marker in line and line.strip()]
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def unwrap_state_dict(obj: object, what: str) -> dict[str, torch.Tensor]:
    """The tensor dict inside a checkpoint: LAVIS saves `{"model": state_dict, "optimizer": ..., ...}`."""
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping):
        raise ValueError(
            f"{what}: expected a state dict (or a dict with a 'model' state dict), found {type(obj).__name__}."
        )
    not_tensors = [key for key, value in obj.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise ValueError(
            f"{what}: expected a state dict of tensors, found non-tensor entries {not_tensors[:10]}"
            f"{' ...' if len(not_tensors) > 10 else ''} (top-level keys: {list(obj)[:10]})."
        )
    return dict(obj)


def load_safetensors_file(path: Path, progress: bool = True) -> dict[str, torch.Tensor]:
    """`safetensors.torch.load_file(path)`, tensor by tensor under a progress bar (same keys, order and values)."""
    with safe_open(path, framework="pt") as handle:
        # File order, as load_file reads them (safetensors < 0.5 has no offset_keys: its keys() order then).
        keys = handle.offset_keys() if hasattr(handle, "offset_keys") else handle.keys()
        return {key: handle.get_tensor(key)
                for key in tqdm(keys, desc=f"reading {path.name}", unit="tensor", leave=False, disable=not progress)}


def load_state_dict_file(path: str | Path, what: str, progress: bool = True) -> dict[str, torch.Tensor]:
    """A state dict from a `.safetensors` file (read under a progress bar) or (safely, memory-mapped) from a `.pth`
    / `.bin` checkpoint."""
    path = Path(path)
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise ValueError(f"{what}: expected an existing file, found no file at {path}.")
        try:
            return load_safetensors_file(path, progress)
        except Exception as err:  # safetensors raises its own error types
            raise ValueError(f"{what}: {path} is not a valid safetensors file: {err}") from None
    return unwrap_state_dict(load_torch_file(path, what), what)


def resolve_llm_folder(llm: str) -> Path:
    """A local folder as is; otherwise a Hub repo id, downloaded (config, weights, tokenizer files)."""
    if Path(llm).is_dir():
        return Path(llm)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(llm, allow_patterns=["*.json", "*.model", *LLM_WEIGHT_PATTERNS]))


def load_llm(llm: str, what: str = "--llm") -> tuple[dict[str, torch.Tensor], PretrainedConfig]:
    """The state dict and config of a Hugging Face LLM (Hub id or local folder)."""
    folder = resolve_llm_folder(llm)
    config = AutoConfig.from_pretrained(folder)
    for pattern in LLM_WEIGHT_PATTERNS:
        files = sorted(folder.glob(pattern))
        if files:
            break
    else:
        raise ValueError(f"{what}: expected weight files ({' or '.join(LLM_WEIGHT_PATTERNS)}) in {folder}, found none.")
    state_dict: dict[str, torch.Tensor] = {}
    for file in tqdm(files, desc=f"reading {folder.name}", unit="file"):
        part = load_state_dict_file(file, what)
        clashes = sorted(set(part) & set(state_dict))
        if clashes:
            raise ValueError(f"{what}: keys {clashes[:5]} appear in more than one weight file of {folder}.")
        state_dict.update(part)
    return state_dict, config
