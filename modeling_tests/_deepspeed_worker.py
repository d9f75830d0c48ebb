"""DeepSpeed ZeRO-2 and ZeRO-3 runs of the tiny instruction-tuning setup of `_distributed_worker.py`.

    python -m torch.distributed.run --nproc_per_node 2 _deepspeed_worker.py OUT_DIR

Each rank trains with `InstructBlipTrainer` + `BalancedConcatSampler` + Q-Former-only freezing under the shipped
`examples/multi_gpu/ds_zero{2,3}.json` (`TrainingArguments(deepspeed=...)`), per-device batch 2, on DeepSpeed's CPU
accelerator over gloo, recording the LM head's output widths (0: the fused head loss ran on the gathered head). After
each run every rank gathers the trained weights (rank 0 writes `OUT_DIR/zero{S}.safetensors`) and saves the model
with `save_trainable_only=True` into `OUT_DIR/zero{S}_trainable`; after ZeRO-3, also the full model
(`stage3_gather_16bit_weights_on_model_save`) into `OUT_DIR/zero3_model`. Rank r writes `OUT_DIR/zero{S}_rank{r}.json`.

accelerate keeps DeepSpeed off for CPU processes (its state skips the DeepSpeed plugin); `allow_deepspeed_on_cpu`
lifts that refusal and nothing else: the engine itself runs on DeepSpeed's CPU accelerator.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

import _distributed_worker as worker
from _fsdp_worker import record_head_widths
from hf_instructblip.training.freezing import trainable_state_dict

CONFIGS = Path(__file__).resolve().parents[1] / "examples" / "multi_gpu"


def allow_deepspeed_on_cpu() -> None:
    """Let accelerate's state keep a DeepSpeed plugin when the processes run on CPU."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    init = AcceleratorState.__init__

    def patched(self, *args: Any, deepspeed_plugin=None, **kwargs: Any) -> None:
        init(self, *args, deepspeed_plugin=deepspeed_plugin, **kwargs)
        if deepspeed_plugin is not None and self.deepspeed_plugins is None:
            # The partial state too: every later `AcceleratorState()` copies its distributed type back in.
            PartialState._shared_state["distributed_type"] = self.distributed_type = DistributedType.DEEPSPEED
            deepspeed_plugin.set_mixed_precision("no")
            deepspeed_plugin.select(_from_accelerator_state=True)
            self.deepspeed_plugins = deepspeed_plugin

    AcceleratorState.__init__ = patched


def run(out_dir: Path, stage: int) -> None:
    trainer = worker.make_trainer(out_dir / f"zero{stage}_run", batch_size=2, use_cpu=True, ddp_backend="gloo",
                                  deepspeed=str(CONFIGS / f"ds_zero{stage}.json"), **worker.DISTRIBUTED_ARGS)
    widths = record_head_widths(trainer.model)
    trainer.train()
    rank = trainer.args.process_index
    weights = trainable_state_dict(trainer.model)  # every rank: ZeRO-3 shards are gathered
    trainer.save_trainable_only = True  # `make_trainer` passes its keywords to TrainingArguments
    trainer.save_model(str(out_dir / f"zero{stage}_trainable"))
    if stage == 3:
        trainer.save_trainable_only = False
        trainer.save_model(str(out_dir / "zero3_model"))
    if rank == 0:
        save_file(weights, str(out_dir / f"zero{stage}.safetensors"))
    record = {"world_size": trainer.args.world_size, "deepspeed": trainer.is_deepspeed_enabled,
              "zero3_partitioned": hasattr(trainer.model.qformer.encoder.layer[0].output.dense.weight, "ds_id"),
              "consumed": trainer.consumed, "head_widths": widths}
    (out_dir / f"zero{stage}_rank{rank}.json").write_text(json.dumps(record))


def skip_shared_memory_comm() -> None:
    """DeepSpeed's CPU accelerator compiles a shared-memory all-reduce (C++, minutes) on first use; gloo does the
    job."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def main(out_dir: Path) -> None:
    torch.set_num_threads(1)  # two ranks share a small machine
    allow_deepspeed_on_cpu()
    skip_shared_memory_comm()
    for stage in (2, 3):
        run(out_dir, stage)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
