"""A tiny InstructBLIP instruction-tuning run through `InstructBlipTrainer` + `BalancedConcatSampler`, recorded.

Shared by `test_distributed.py` and `test_resume.py`. The trainer records, per optimizer micro-batch, the
ConcatDataset indices it consumed and the loss it computed (in `compute_loss`, i.e. what reached the model,
not what the DataLoader prefetched).

As a script, one process per rank:

    python -m torch.distributed.run --nproc_per_node 2 --master_port PORT _distributed_worker.py OUT_DIR

each rank trains 2 epochs (per-device batch 2, SGD; a checkpoint at `RESUME_STEP`, mid-epoch 1), then resumes a
freshly built model from that checkpoint and trains to the end again. It writes `OUT_DIR/rank{R}.json`
(`consumed`, `resumed_consumed`: one index list per micro-batch) and `OUT_DIR/rank{R}_{full,resumed}.safetensors`
(the trainable weights at the end of each run).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch.utils.data import ConcatDataset
from transformers import TrainingArguments

import tiny
from hf_instructblip import (
    BalancedConcatSampler,
    InstructBlipConfig,
    InstructBlipDataCollator,
    InstructBlipForConditionalGeneration,
    InstructBlipProcessor,
    InstructBlipTrainer,
    freeze_for_instruction_tuning,
)

NAMES = ("vqa", "caption")
SIZES = (4, 16)
# 12 = a multiple of every global batch used (4), so accelerate never pads a last batch with repeated samples.
# sqrt weights 2 : 4 give (4, 8) per epoch: a whole permutation of dataset 0 and half of one of dataset 1, so no
# index repeats inside an epoch and "no overlap between ranks" is checkable by index.
NUM_SAMPLES = 12
EPOCHS = 2
RESUME_STEP = 4  # global batch 4 -> 3 steps per epoch: step 4 is in the middle of epoch 1
SAMPLER_SEED = 3
INSTRUCTIONS = ["what is in the picture ?", "describe the image briefly .", "how many shapes are there ?",
                "what colour is the circle ?", "question : what shape is shown ?", "is this a cat or a dog ?"]
ANSWERS = ["a red circle on a white background .", "a blue square .", "two .", "red .",
           "two yellow stars in the sky .", "a dog ."]  # unequal lengths: micro-batches differ in label tokens


def make_processor() -> InstructBlipProcessor:
    return InstructBlipProcessor(tiny.image_processor(), tiny.llm_tokenizer("llama"), tiny.qformer_tokenizer(),
                                 num_query_tokens=tiny.NUM_QUERY_TOKENS)


def make_model(processor: InstructBlipProcessor, seed: int = 0) -> InstructBlipForConditionalGeneration:
    """Tiny Llama-based model (every dropout 0 in the configs), N(0, 0.2) weights, frozen but for the Q-Former."""
    config = InstructBlipConfig(**tiny.config_kwargs("llama", image_token_index=processor.image_token_id))
    model = InstructBlipForConditionalGeneration(config)
    tiny.randomize_(model, seed=seed)
    freeze_for_instruction_tuning(model)
    return model


def make_dataset() -> ConcatDataset:
    """Two named datasets of `SIZES`; every record carries its global ConcatDataset index as `sample_index`."""
    images = tiny.images(sum(SIZES))
    parts, start = [], 0
    for name, size in zip(NAMES, SIZES):
        parts.append([{"image": images[i], "instruction": INSTRUCTIONS[i % 6], "answer": ANSWERS[(i * 5) % 6],
                       "dataset": name, "sample_index": i} for i in range(start, start + size)])
        start += size
    return ConcatDataset(parts)


def make_sampler(dataset: ConcatDataset) -> BalancedConcatSampler:
    return BalancedConcatSampler(dataset, names=NAMES, num_samples=NUM_SAMPLES, seed=SAMPLER_SEED)


class IndexedCollator:
    """`InstructBlipDataCollator` that also returns the records' `sample_index` as a `[B]` tensor."""

    def __init__(self, collator: InstructBlipDataCollator) -> None:
        self.collator = collator

    def __call__(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        indices = [record["sample_index"] for record in records]
        batch = self.collator([{k: v for k, v in record.items() if k != "sample_index"} for record in records])
        return {**batch, "sample_index": torch.tensor(indices)}


class RecordingTrainer(InstructBlipTrainer):
    """Records what each training micro-batch consumed: `consumed` (index lists) and `losses` (floats)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.consumed: list[list[int]] = []
        self.losses: list[float] = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        indices = inputs.pop("sample_index")
        result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                      num_items_in_batch=num_items_in_batch)
        if model.training:
            self.consumed.append(indices.tolist())
            self.losses.append((result[0] if return_outputs else result).item())
        return result


def make_trainer(output_dir: str | Path, *, batch_size: int, model_seed: int = 0, callbacks: list | None = None,
                 sampler: BalancedConcatSampler | None = None, **overrides: Any) -> RecordingTrainer:
    """A fresh processor, model (initialised from `model_seed`), dataset and sampler (unless given), in a
    `RecordingTrainer`; `overrides` go to `TrainingArguments`."""
    processor = make_processor()
    dataset = make_dataset()
    args = dict(output_dir=str(output_dir), report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no",
                logging_steps=1, num_train_epochs=EPOCHS, per_device_train_batch_size=batch_size,
                dataloader_num_workers=0, seed=0)
    return RecordingTrainer(
        model=make_model(processor, seed=model_seed), args=TrainingArguments(**{**args, **overrides}),
        train_dataset=dataset, train_sampler=sampler or make_sampler(dataset), callbacks=callbacks,
        data_collator=IndexedCollator(InstructBlipDataCollator(processor, decoder_only=True)),
    )


def trainable_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters by name (unwrapping DDP), detached copies."""
    model = getattr(model, "module", model)
    return {name: p.detach().clone().contiguous() for name, p in model.named_parameters() if p.requires_grad}


DISTRIBUTED_ARGS = dict(optim="sgd", learning_rate=0.5, lr_scheduler_type="constant")


def main(out_dir: Path) -> None:
    torch.set_num_threads(1)  # two ranks share a small machine
    run_dir = out_dir / "run"
    # gloo: CPU collectives (naming a backend in one process would make accelerate expect a process group).
    args = dict(batch_size=2, save_strategy="steps", save_steps=RESUME_STEP, ddp_backend="gloo", **DISTRIBUTED_ARGS)
    full = make_trainer(run_dir, **args)
    full.train()
    # Resume a model built from another seed: everything that matters must come from the checkpoint.
    resumed = make_trainer(run_dir, model_seed=1, **args)
    resumed.train(resume_from_checkpoint=str(run_dir / f"checkpoint-{RESUME_STEP}"))

    rank = full.args.process_index
    assert full.args.world_size > 1, "run this script under torchrun with several processes"
    record = {"rank": rank, "world_size": full.args.world_size, "consumed": full.consumed,
              "resumed_consumed": resumed.consumed}
    (out_dir / f"rank{rank}.json").write_text(json.dumps(record))
    save_file(trainable_weights(full.model), str(out_dir / f"rank{rank}_full.safetensors"))
    save_file(trainable_weights(resumed.model), str(out_dir / f"rank{rank}_resumed.safetensors"))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
