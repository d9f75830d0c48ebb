"""Publish to the Hugging Face Hub: model + processor + model card, or only the trainable weights (Q-Former delta).

    python examples/push.py                                         # dry run: writes the repos under --output-dir
    python examples/push.py --model outputs/quickstart/model --repo-id me/instructblip-shapes --push
    python examples/push.py --model outputs/finetune/model --trainable-only --base-model me/instructblip-shapes --push

Without `--push` nothing is sent: `hf_instructblip.hub.LocalHubApi` stands in for the Hub and writes each commit
into `<output-dir>/<repo id>/`, exactly the files a push would upload (the same code path down to
`HfApi.create_commit`). The script then loads what was written, as a Hub user would:
- the full repo with `AutoModel.from_pretrained(folder, trust_remote_code=True)` + `AutoProcessor`;
- the trainable-only repo with `load_trainable_weights` on its base;
and checks the logits against the in-process model.

Default (embedded model): push it as `<repo-id>`, train its Q-Former for a few steps, and push the trained
weights alone as `<repo-id>-qformer` on that base. `--trainable-only` pushes just the latter (needs `--base-model`
unless `--model` is a Hub id).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.utils.data import ConcatDataset
from transformers import AutoModel, AutoProcessor, TrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parent))  # examples/shapes.py, when run from anywhere
import shapes  # noqa: E402

import hf_instructblip  # noqa: E402,F401  (registers the Auto classes)
from hf_instructblip import (  # noqa: E402
    InstructBlipDataCollator,
    InstructBlipTrainer,
    freeze_for_instruction_tuning,
    load_trainable_weights,
)
from hf_instructblip.hub import LocalHubApi, push_to_hub, push_trainable_to_hub  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint folder or Hub id (default: the embedded small model)")
    parser.add_argument("--repo-id", default="your-name/instructblip-shapes")
    parser.add_argument("--trainable-only", action="store_true", help="push only the trainable weights")
    parser.add_argument("--base-model", help="Hub id the trainable weights apply to (for --trainable-only)")
    parser.add_argument("--license", default=None, help="card licence, e.g. mit (default: 'other' + a note)")
    parser.add_argument("--dataset", action="append", default=[], help="Hub dataset id for the card (repeatable)")
    parser.add_argument("--overwrite-card", action="store_true", help="replace a README.md already on the repo")
    parser.add_argument("--private", action="store_true")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--push", action="store_true", help="really send to the Hub (needs `hf auth login`)")
    mode.add_argument("--dry-run", action="store_true", help="write the repos under --output-dir (the default)")
    parser.add_argument("--output-dir", default="outputs/push", help="where a dry run writes the repos")
    parser.add_argument("--steps", type=int, default=3, help="Q-Former training steps before the trainable push")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def load(model_id: str | None, seed: int):
    if model_id:
        return shapes.load_checkpoint(model_id)
    processor = shapes.build_processor()
    return shapes.build_model(processor, seed=seed), processor


def train_qformer(model, processor, steps: int, seed: int, output_dir: Path) -> None:
    """A few Q-Former-only steps, so the trainable weights differ from the base's."""
    freeze_for_instruction_tuning(model)
    dataset = ConcatDataset([shapes.make_records(task, 32, seed + i) for i, task in enumerate(shapes.TASKS)])
    args = TrainingArguments(output_dir=str(output_dir / "trainer"), max_steps=steps, per_device_train_batch_size=8,
                             learning_rate=1e-3, save_strategy="no", report_to=[], seed=seed,
                             dataloader_num_workers=0, disable_tqdm=True)
    collator = InstructBlipDataCollator(processor, decoder_only=model.config.use_decoder_only_language_model)
    InstructBlipTrainer(model=model, args=args, train_dataset=dataset, data_collator=collator).train()


@torch.no_grad()
def same_logits(model, other, processor, seed: int) -> bool:
    records = [r for i, task in enumerate(shapes.TASKS) for r in shapes.make_records(task, 2, seed + 90 + i)]
    inputs = processor(images=[r["image"] for r in records], text=[r["instruction"] for r in records],
                       return_tensors="pt")
    return torch.allclose(model.eval()(**inputs).logits, other.eval()(**inputs).logits, atol=1e-5)


def check_full(api: LocalHubApi, repo_id: str, model, processor, seed: int) -> bool:
    folder = api.repo_folder(repo_id)
    loaded = AutoModel.from_pretrained(folder, trust_remote_code=True)
    loaded_processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    return same_logits(model, loaded, loaded_processor, seed)


def check_trainable(api: LocalHubApi, repo_id: str, base_repo: str, model, processor, seed: int) -> bool:
    base = AutoModel.from_pretrained(api.repo_folder(base_repo), trust_remote_code=True)
    load_trainable_weights(base, api.repo_folder(repo_id))
    return same_logits(model, base, processor, seed)


def show(api: LocalHubApi | None, info) -> None:
    print(f"commit: {info.commit_url}")
    if api is not None:
        repo_id, paths = api.commits[-1]
        print(f"  wrote {len(paths)} files to {api.repo_folder(repo_id)}: {', '.join(paths)}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    api = None if args.push else LocalHubApi(args.output_dir)
    card = dict(license=args.license, datasets=args.dataset or None, overwrite_card=args.overwrite_card,
                private=args.private or None, api=api)
    model, processor = load(args.model, args.seed)
    ok = True

    if not args.trainable_only:
        show(api, push_to_hub(model, args.repo_id, processor, **card))
        if api is not None:
            ok &= check_full(api, args.repo_id, model, processor, args.seed)
            print(f"  reloaded with trust_remote_code: logits {'match' if ok else 'DIFFER'}")
        if args.model:  # a given checkpoint is pushed as is; the delta demo needs the embedded base
            return 0 if ok else 1

    base_repo = args.base_model or (None if args.trainable_only else args.repo_id)
    delta_repo = f"{args.repo_id}-qformer" if not args.trainable_only else args.repo_id
    if not args.model:
        train_qformer(model, processor, args.steps, args.seed, Path(args.output_dir))
    show(api, push_trainable_to_hub(model, delta_repo, base_model=base_repo, **card))
    if api is not None and base_repo is not None and api.repo_folder(base_repo).is_dir():
        matched = check_trainable(api, delta_repo, base_repo, model, processor, args.seed)
        print(f"  trainable weights applied to the base {base_repo}: logits {'match' if matched else 'DIFFER'}")
        ok &= matched
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
