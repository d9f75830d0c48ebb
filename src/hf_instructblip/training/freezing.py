"""Q-Former-only instruction tuning: which weights train, and saving / loading just those.

The paper trains the Q-Former, its query tokens and `language_projection`; the image encoder and the LLM stay
frozen *and in eval mode* (LAVIS replaces their `train` with a no-op), so no dropout runs in them. LAVIS also
trains `ln_vision` (our `vision_model.post_layernorm`): opt in with `train_post_layernorm=True`.

PEFT adapters are left as PEFT set them: `peft_model = get_peft_model(model, lora_config)`, then
`freeze_for_instruction_tuning(peft_model)` (in that order: `get_peft_model` freezes every non-adapter weight).

Quantized models (`from_pretrained(..., quantization_config=...)`: bitsandbytes, torchao, optimum-quanto) freeze the
same way: the model class keeps the trained parts out of quantization (`_keep_in_fp32_modules`), and quantized
weights, which cannot train, are only ever frozen; a trained part that holds some is refused.
"""

from __future__ import annotations

import contextlib
import os
import types
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without distributed support: nothing is sharded
    DTensor = ()

TRAINABLE_WEIGHTS_NAME = "instructblip_trainable.safetensors"
FROZEN_PARTS = ("vision_model", "language_model")
TRAINED_PARTS = ("qformer", "query_tokens", "language_projection")


def instructblip_base(model: nn.Module) -> nn.Module:
    """The InstructBLIP model inside `model` (unwraps a PEFT model); checks it has the expected parts."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    missing = [name for name in FROZEN_PARTS + TRAINED_PARTS if not hasattr(base, name)]
    if missing:
        raise TypeError(f"`model` must be an InstructBlipForConditionalGeneration (optionally PEFT-wrapped); "
                        f"found {type(model).__name__} without {missing}.")
    return base


def adapter_parameter_names(model: nn.Module) -> set[str]:
    """Names of PEFT adapter weights (inside PEFT tuner layers, outside their wrapped `base_layer`)."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # no PEFT, no adapters
        return set()
    names = set()
    for prefix, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            names.update(f"{prefix}.{name}" for name, _ in module.named_parameters()
                         if not name.startswith("base_layer."))
    return names


def is_quantized(param: torch.Tensor) -> bool:
    """Whether `param` holds quantized weights: integer storage (bitsandbytes' `Int8Params` / `Params4bit`) or a
    tensor subclass that reports a float dtype over quantized data (optimum-quanto, torchao)."""
    if not param.is_floating_point():
        return True
    data = param.data
    return type(data) is not torch.Tensor and not isinstance(data, DTensor)  # FSDP2 shards are plain weights


def quantized_parameter_names(model: nn.Module) -> set[str]:
    """Names of the parameters of `model` that hold quantized weights (see `is_quantized`)."""
    return {name for name, param in model.named_parameters() if is_quantized(param)}


def _refuse_quantized(base: nn.Module, parts: list[str]) -> None:
    """Raise if a part that is about to train holds quantized weights (they cannot require gradients)."""
    found = sorted(name for name in quantized_parameter_names(base)
                   if any(name == part or name.startswith(f"{part}.") for part in parts))
    if not found:
        return
    param = base.get_parameter(found[0])
    kind = type(param).__name__ if type(param.data) is torch.Tensor else type(param.data).__name__
    where = sorted({part for part in parts for name in found if name == part or name.startswith(f"{part}.")})
    raise ValueError(
        f"`model`: the trained parts {parts} must hold full-precision weights; found {len(found)} quantized in "
        f"{where} (e.g. {found[0]}: {kind} of {param.dtype}). Load the model through "
        "InstructBlipForConditionalGeneration.from_pretrained(..., quantization_config=...), which keeps qformer, "
        "query_tokens and language_projection out of quantization, and quantize nothing else by hand."
    )


def _stay_in_eval(self: nn.Module, mode: bool = True) -> nn.Module:
    """Replacement `train` for frozen parts: whatever `mode` is asked for, the module (and children) stay in eval."""
    return nn.Module.train(self, False)


def _pin_eval(module: nn.Module) -> None:
    # An instance attribute shadows `nn.Module.train`, and `model.train()` reaches children through `.train`.
    module.train = types.MethodType(_stay_in_eval, module)
    module.eval()


@dataclass
class ParameterTable:
    """Trainable vs frozen parameter counts per sub-module; `str(table)` renders it.

    Example:
        >>> parameter_table(model).frozen
    """

    rows: list[tuple[str, int, int]] = field(default_factory=list)  # (part, trainable, frozen)

    @property
    def trainable(self) -> int:
        return sum(row[1] for row in self.rows)

    @property
    def frozen(self) -> int:
        return sum(row[2] for row in self.rows)

    def __str__(self) -> str:
        lines = [f"{'part':<28} {'trainable':>14} {'frozen':>14}"]
        lines += [f"{part:<28} {trained:>14,} {frozen:>14,}" for part, trained, frozen in self.rows]
        lines.append(f"{'total':<28} {self.trainable:>14,} {self.frozen:>14,}")
        return "\n".join(lines)


def parameter_table(model: nn.Module) -> ParameterTable:
    """Count trainable / frozen parameters per top-level part (`post_layernorm` gets its own row)."""
    counts: dict[str, list[int]] = {}
    for name, param in instructblip_base(model).named_parameters():
        part = "vision_model.post_layernorm" if name.startswith("vision_model.post_layernorm.") else name.split(".")[0]
        slot = counts.setdefault(part, [0, 0])
        slot[0 if param.requires_grad else 1] += param.numel()
    return ParameterTable([(part, trained, frozen) for part, (trained, frozen) in counts.items()])


def freeze_for_instruction_tuning(
    model: nn.Module, train_post_layernorm: bool = False, frozen_in_eval: bool = True, print_table: bool = False,
) -> ParameterTable:
    """Freeze the image encoder and the LLM, train the Q-Former, queries and projection (the paper's recipe);
    returns the `ParameterTable`. PEFT adapters keep their flags. `frozen_in_eval` pins the frozen parts in eval
    mode, so `model.train()` enables no dropout in them (nor in adapters inside the LLM). Quantized weights (in the
    image encoder or the LLM) stay frozen; a `ValueError` names any in the parts that train.

    Example:
        >>> table = freeze_for_instruction_tuning(model)
        >>> table.trainable  # Q-Former + queries + projection: ~0.19 B for InstructBLIP-Vicuna-7B
    """
    base = instructblip_base(model)
    _refuse_quantized(base, list(TRAINED_PARTS) + (["vision_model.post_layernorm"] if train_post_layernorm else []))
    adapter_names = adapter_parameter_names(base)
    adapter_flags = [(param, param.requires_grad) for name, param in base.named_parameters() if name in adapter_names]
    for part in FROZEN_PARTS:
        getattr(base, part).requires_grad_(False)
    for param, flag in adapter_flags:  # as PEFT set them
        param.requires_grad_(flag)
    for part in TRAINED_PARTS:
        getattr(base, part).requires_grad_(True)
    base.vision_model.post_layernorm.requires_grad_(train_post_layernorm)
    if frozen_in_eval:
        for part in FROZEN_PARTS:
            _pin_eval(getattr(base, part))
    table = parameter_table(base)
    if print_table:
        print(table)
    return table


# --- trainable-only checkpoints -------------------------------------------------------------------------------
def _whole(param: torch.Tensor) -> torch.Tensor:
    """The whole value of a parameter: FSDP2 keeps each one as a DTensor shard (gathering it is a collective, so
    every process must call this, in the same order)."""
    return param.full_tensor() if isinstance(param, DTensor) else param


def _zero3_gathered(params: list[nn.Parameter]) -> contextlib.AbstractContextManager:
    """ZeRO-3 leaves each process a shard in `param.data` (an empty tensor): gather them while they are read."""
    if not any(hasattr(param, "ds_id") for param in params):
        return contextlib.nullcontext()
    import deepspeed  # only reached for parameters DeepSpeed has partitioned

    return deepspeed.zero.GatheredParameters(params)


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights that train (`requires_grad`), PEFT adapters excluded (PEFT saves those itself), under the
    InstructBLIP state-dict keys (`qformer.*`, `query_tokens`, `language_projection.*`, ...). Under FSDP2 or ZeRO-3
    every process must call it (the shards are gathered)."""
    base = instructblip_base(model)
    adapters = adapter_parameter_names(base)
    trained = {name: param for name, param in base.named_parameters() if param.requires_grad and name not in adapters}
    with _zero3_gathered(list(trained.values())):
        # A copy: ZeRO-3 frees the gathered tensors on leaving the context.
        return {name: _whole(param.detach()).to("cpu", copy=True).contiguous() for name, param in trained.items()}


def save_trainable_weights(
    model: nn.Module, directory: str | os.PathLike, weights: dict[str, torch.Tensor] | None = None
) -> Path:
    """Write `weights` (default: `trainable_state_dict(model)`) to `directory/instructblip_trainable.safetensors`;
    return the path. Under FSDP2 or ZeRO-3 every process gathers the weights and one writes them."""
    path = Path(directory) / TRAINABLE_WEIGHTS_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(trainable_state_dict(model) if weights is None else weights, str(path), metadata={"format": "pt"})
    return path


def load_trainable_weights(model: nn.Module, checkpoint: str | os.PathLike) -> list[str]:
    """Load trainable-only weights (the file, or a directory holding `instructblip_trainable.safetensors`) on top
    of a base model; returns the names loaded. Every key must exist in `model` with the same shape.

    Example:
        >>> model = InstructBlipForConditionalGeneration.from_pretrained("Salesforce/instructblip-vicuna-7b")
        >>> load_trainable_weights(model, "output/checkpoint-500")
        >>> # PEFT run: then `model = PeftModel.from_pretrained(model, "output/checkpoint-500")`
    """
    path = Path(checkpoint)
    if path.is_dir():
        path = path / TRAINABLE_WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"`checkpoint`: no trainable-weights file at {path}.")
    weights = load_file(str(path))
    params = dict(instructblip_base(model).named_parameters())
    unknown = sorted(set(weights) - set(params))
    if unknown:
        raise ValueError(f"`checkpoint` {path} holds weights the model does not have: {unknown[:5]}"
                         f"{' ...' if len(unknown) > 5 else ''}.")
    wrong = {k: (tuple(v.shape), tuple(params[k].shape)) for k, v in weights.items() if v.shape != params[k].shape}
    if wrong:
        raise ValueError(f"`checkpoint` {path}: shapes differ from the model's (file, model): {wrong}.")
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)
    return sorted(weights)
