"""FSDP runs of the tiny instruction-tuning setup of `_distributed_worker.py`, recorded for `test_fsdp.py`.

    python -m torch.distributed.run --nproc_per_node 2 _fsdp_worker.py OUT_DIR

Each rank, in one process group (gloo, CPU):
1. `sharded`: `InstructBlipTrainer` + `BalancedConcatSampler` + Q-Former-only freezing under FSDP2, configured the
   way a user does (`TrainingArguments(fsdp=True, fsdp_config=...)`), per-device batch 2, sharded checkpoints with
   `save_trainable_only=True`, a checkpoint at `RESUME_STEP`. The LM head's output widths are recorded: 0 where the
   fused head loss ran on the gathered head.
2. `resumed`: a model built from another seed resumes from that checkpoint and trains to the end.
3. `full`: full-state-dict FSDP2 for `RESUME_STEP` steps, then `trainer.save_model(OUT_DIR/full_model)`; `bf16`:
   2 steps of the README's `--bf16` layout (frozen weights bf16, trained fp32) under FSDP2 mixed precision.
4. The fused head loss under hand-made shardings (FSDP2 / FSDP1, the head in its own unit or inside a larger one):
   loss and gathered gradients next to the unsharded model's, and whether the fused path ran.
5. What `InstructBlipTrainer` refuses under FSDP (`refusals`).
Rank 0 writes `OUT_DIR/record.json`, the trained weights `OUT_DIR/{sharded,resumed}.safetensors`; each rank writes
`OUT_DIR/consumed{R}.json`.

accelerate turns FSDP on only for accelerator devices: on CPU its state drops the FSDP plugin (FSDP1's plugin even
raises). `allow_fsdp_on_cpu` lifts that refusal and nothing else; `fully_shard` itself runs on CPU with gloo.
"""

from __future__ import annotations

import copy
import functools
import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn

import _distributed_worker as worker
from hf_instructblip import InstructBlipDataCollator
from hf_instructblip.training.freezing import trainable_state_dict

FSDP2 = dict(fsdp=True, fsdp_config={"version": 2, "state_dict_type": "SHARDED_STATE_DICT"})
FSDP2_FULL = dict(fsdp=True, fsdp_config={"version": 2, "state_dict_type": "FULL_STATE_DICT"})
ARGS = dict(batch_size=2, ddp_backend="gloo", **worker.DISTRIBUTED_ARGS)


def allow_fsdp_on_cpu() -> None:
    """Let accelerate's state keep an FSDP plugin when the processes run on CPU (MULTI_CPU)."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    init = AcceleratorState.__init__

    def patched(self, *args: Any, fsdp_plugin=None, **kwargs: Any) -> None:
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            # The partial state too: every later `AcceleratorState()` copies its distributed type back in.
            PartialState._shared_state["distributed_type"] = self.distributed_type = DistributedType.FSDP
            if self._mixed_precision != "no":  # what accelerate does for FSDP on accelerators
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin

    AcceleratorState.__init__ = patched


def record_head_widths(model: nn.Module) -> list[int]:
    """Positions of every LM-head output from now on: 0 where the fused loss replaced the logits."""
    widths: list[int] = []
    head = model.language_model.get_output_embeddings()
    head.register_forward_hook(lambda _module, _args, output: widths.append(output.shape[1]))
    return widths


def fsdp_units(model: nn.Module) -> list[str]:
    from torch.distributed.fsdp import FSDPModule

    return [name for name, module in model.named_modules() if isinstance(module, FSDPModule)]


def train_runs(out_dir: Path) -> dict[str, Any]:
    run_dir = out_dir / "run"
    sharded = worker.make_trainer(run_dir, save_strategy="steps", save_steps=worker.RESUME_STEP, **FSDP2, **ARGS)
    sharded.save_trainable_only = True  # `make_trainer` passes its keywords to TrainingArguments
    widths = record_head_widths(sharded.model)
    sharded.train()
    resumed = worker.make_trainer(run_dir, model_seed=1, save_strategy="steps", save_steps=worker.RESUME_STEP,
                                  **FSDP2, **ARGS)
    resumed.save_trainable_only = True
    resumed.train(resume_from_checkpoint=str(run_dir / f"checkpoint-{worker.RESUME_STEP}"))
    full = worker.make_trainer(out_dir / "full_run", max_steps=worker.RESUME_STEP, **FSDP2_FULL, **ARGS)
    full.train()
    full.save_model(str(out_dir / "full_model"))  # every rank: the state dict is gathered
    mixed = bf16_run(out_dir)

    rank = sharded.args.process_index
    weights = {name: trainable_state_dict(trainer.model) for name, trainer in (("sharded", sharded),
                                                                              ("resumed", resumed))}
    (out_dir / f"consumed{rank}.json").write_text(json.dumps(
        {"sharded": sharded.consumed, "resumed": resumed.consumed, "bf16_losses": mixed.pop("losses")}))
    if rank == 0:
        for name, tensors in weights.items():
            save_file(tensors, str(out_dir / f"{name}.safetensors"))
    return {"world_size": sharded.args.world_size, "fsdp_enabled": sharded.is_fsdp_enabled,
            "units": fsdp_units(sharded.model), "head_widths": widths, "bf16": mixed}


def bf16_run(out_dir: Path) -> dict[str, Any]:
    """The README's recipe (`--bf16`): frozen weights in bf16, trained ones in fp32, FSDP2 mixed precision."""
    trainer = worker.make_trainer(out_dir / "bf16_run", max_steps=2, bf16=True, **FSDP2, **ARGS)
    trainer.model.to(torch.bfloat16)
    for param in trainer.model.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    widths = record_head_widths(trainer.model)
    trainer.train()
    frozen = {str(p.dtype) for p in trainer.model.parameters() if not p.requires_grad}
    return {"losses": trainer.losses, "head_widths": widths, "frozen_dtypes": sorted(frozen),
            "trained_dtypes": sorted({str(t.dtype) for t in trainable_state_dict(trainer.model).values()})}


# --- the fused head loss under hand-made shardings -------------------------------------------------------------
def fixed_batch() -> dict[str, torch.Tensor]:
    dataset = worker.make_dataset()
    records = [{k: v for k, v in dataset[i].items() if k != "sample_index"} for i in (0, 5, 9)]
    return InstructBlipDataCollator(worker.make_processor(), decoder_only=True)(records)


def loss_and_grads(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[float, list[int]]:
    model.zero_grad()
    widths = record_head_widths(model)
    output = model(**batch, fused_head_loss=True)
    output.loss.backward()
    return output.loss.item(), widths


def fsdp2_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.full_tensor() for name, p in model.named_parameters() if p.requires_grad}


def fsdp1_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with FSDP.summon_full_params(model, with_grads=True):
        return {name.replace("_fsdp_wrapped_module.", ""): p.grad.clone() for name, p in model.named_parameters()
                if p.requires_grad}


def shard_fsdp2(model: nn.Module, head: str) -> nn.Module:
    """`head`: "unit" (its own unit, accelerate's layout), "inside" (the LLM's unit) or "root" (the model's unit)."""
    from torch.distributed.fsdp import fully_shard

    llm = model.language_model
    # Our forward embeds the prompt before the LLM runs: the input embeddings need a unit of their own (as accelerate
    # gives them), else they are still shards when used.
    fully_shard(llm.get_input_embeddings())
    if head == "unit":
        fully_shard(llm.get_output_embeddings())
    if head in ("unit", "root"):
        for layer in llm.model.layers:
            fully_shard(layer)
    else:
        fully_shard(llm)
    return fully_shard(model)


def shard_fsdp1(model: nn.Module, head_unit: bool) -> nn.Module:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy

    head = model.language_model.get_output_embeddings()
    policy = functools.partial(lambda_auto_wrap_policy, lambda_fn=lambda module: module is head) if head_unit else None
    # use_orig_params: the root unit holds trained (queries, projection) and frozen weights in one flat parameter.
    return FSDP(model, auto_wrap_policy=policy, use_orig_params=True, device_id=torch.device("cpu"))


def head_placements() -> dict[str, Any]:
    batch = fixed_batch()
    reference = worker.make_model(worker.make_processor()).train()
    expected_loss, _ = loss_and_grads(reference, batch)
    expected = {name: p.grad for name, p in reference.named_parameters() if p.requires_grad}
    results = {}
    for name, shard, grads in (("fsdp2_head_unit", functools.partial(shard_fsdp2, head="unit"), fsdp2_grads),
                               ("fsdp2_head_in_llm_unit", functools.partial(shard_fsdp2, head="inside"), fsdp2_grads),
                               ("fsdp2_head_in_root", functools.partial(shard_fsdp2, head="root"), fsdp2_grads),
                               ("fsdp1_head_unit", functools.partial(shard_fsdp1, head_unit=True), fsdp1_grads),
                               ("fsdp1_head_in_root", functools.partial(shard_fsdp1, head_unit=False), fsdp1_grads)):
        model = shard(copy.deepcopy(reference))
        loss, widths = loss_and_grads(model, batch)
        got = grads(model)
        assert got.keys() == expected.keys(), (name, sorted(set(got) ^ set(expected)))
        results[name] = {"head_widths": widths, "loss_error": abs(loss - expected_loss),
                         "grad_error": max((got[k] - expected[k]).abs().max().item() for k in expected),
                         "grad_scale": max(g.abs().max().item() for g in expected.values())}
    return results


def refusals(out_dir: Path) -> dict[str, str]:
    """What `InstructBlipTrainer` refuses under FSDP, and the message."""
    from transformers import TrainingArguments

    from hf_instructblip import InstructBlipTrainer, VisionFeatureCache

    args = TrainingArguments(str(out_dir / "refused"), use_cpu=True, report_to=[], ddp_backend="gloo", **FSDP2)
    try:
        InstructBlipTrainer(model=worker.make_model(worker.make_processor()), args=args,
                            vision_feature_cache=VisionFeatureCache())
    except ValueError as error:
        return {"vision_feature_cache": str(error)}
    return {}


def main(out_dir: Path) -> None:
    torch.set_num_threads(1)  # two ranks share a small machine
    allow_fsdp_on_cpu()
    record = train_runs(out_dir)
    record["refusals"] = refusals(out_dir)
    record["placements"] = head_placements()
    if dist.get_rank() == 0:
        (out_dir / "record.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
