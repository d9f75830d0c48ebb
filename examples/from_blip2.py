"""Make a new InstructBLIP the paper's way: a pretrained BLIP-2 + any LLM, then instruction-tune the Q-Former.

    python examples/from_blip2.py                     # tiny random BLIP-2, BERT and Llama built offline, seconds
    python examples/from_blip2.py --blip2 Salesforce/blip2-flan-t5-xl --qformer-text bert-base-uncased \
        --language-model Qwen/Qwen2.5-7B-Instruct --dtype bfloat16 --steps 1000 --batch-size 16

Steps: `from_blip2` (vision encoder, queries and Q-Former from BLIP-2; the Q-Former's text side from BERT; the LLM
as is; the projection from BLIP-2 when it fits the LLM, else new) and its provenance report; a balanced mixture
of two instruction datasets (`build_instruction_mixture`: VQA and captioning templates, sqrt-size sampling) from
the coloured-shapes world (`examples/shapes.py`); Q-Former-only training with `InstructBlipTrainer`; accuracy
before and after; save, reload with `AutoModel`, and check that the reloaded model answers the same.

The default sources are random (a real run starts from trained ones), so accuracy may stay near chance: the
example shows the recipe end to end, not a result.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from transformers import AutoModel, BertConfig, BertForMaskedLM, Blip2Config, Blip2ForConditionalGeneration
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parent))  # examples/shapes.py, when run from anywhere
import shapes  # noqa: E402

import hf_instructblip  # noqa: E402,F401  (registers the Auto classes)
from hf_instructblip import from_blip2  # noqa: E402
from hf_instructblip.training.freezing import freeze_for_instruction_tuning  # noqa: E402
from hf_instructblip.training.mixture import MixtureSource, build_instruction_mixture  # noqa: E402
from hf_instructblip.training.trainer import InstructBlipTrainer  # noqa: E402

WIDTH = 32  # tiny sources: Q-Former, vision encoder and LLM width


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blip2", help="BLIP-2 folder / Hub id / LAVIS .pth (default: a tiny random one)")
    parser.add_argument("--language-model", help="LLM folder / Hub id (default: a tiny random Llama)")
    parser.add_argument("--qformer-text", help="BERT or stage-1 BLIP-2 (default: a tiny random BERT)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--output-dir", default="outputs/from_blip2")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def tiny_sources(folder: Path, seed: int) -> tuple[str, str, str]:
    """A random BLIP-2 (stage 2, OPT inside), a masked-LM BERT and a Llama, saved with their tokenizers."""
    torch.manual_seed(seed)
    layers = dict(num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    vision = dict(hidden_size=WIDTH, image_size=shapes.IMAGE_SIZE, patch_size=8, initializer_range=0.02, **layers)
    qformer = dict(hidden_size=WIDTH, vocab_size=len(shapes.qformer_tokenizer()), max_position_embeddings=32, **layers)
    blip2 = Blip2ForConditionalGeneration(Blip2Config(
        vision_config=vision, qformer_config=qformer, num_query_tokens=shapes.NUM_QUERY_TOKENS,
        text_config=dict(model_type="opt", hidden_size=WIDTH, word_embed_proj_dim=WIDTH, ffn_dim=64, **layers)))
    blip2.save_pretrained(folder / "blip2")
    BertForMaskedLM(BertConfig(**{**qformer, **layers})).save_pretrained(folder / "bert")
    shapes.qformer_tokenizer().save_pretrained(folder / "bert")
    llm_tokenizer = shapes.llm_tokenizer()
    LlamaForCausalLM(LlamaConfig(hidden_size=WIDTH, vocab_size=len(llm_tokenizer), num_key_value_heads=2,
                                 bos_token_id=1, eos_token_id=2, pad_token_id=0, **layers)).save_pretrained(folder / "llm")
    llm_tokenizer.save_pretrained(folder / "llm")
    return str(folder / "blip2"), str(folder / "llm"), str(folder / "bert")


def mixture_sources(seed: int) -> list[MixtureSource]:
    """Two instruction datasets: shape/colour questions (VQA templates) and captions (captioning templates)."""
    questions = [{"image": r["image"], "question": r["instruction"], "answer": r["answer"]}
                 for task in ("colour", "shape") for r in shapes.make_records(task, 60, seed + len(task))]
    captions = [{"image": r["image"], "caption": r["answer"]} for r in shapes.make_records("caption", 40, seed + 9)]
    return [MixtureSource("shapes_vqa", questions, task="vqav2"),
            MixtureSource("shapes_caption", captions, task="coco_caption")]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    output = Path(args.output_dir)
    blip2, llm, text = tiny_sources(output / "sources", args.seed)
    result = from_blip2(args.blip2 or blip2, args.language_model or llm, args.qformer_text or text,
                        dtype=getattr(torch, args.dtype), seed=args.seed)
    model, processor = result
    print(result.provenance.summary())

    held_in = shapes.make_records("colour", 16, args.seed + 100) + shapes.make_records("shape", 16, args.seed + 101)
    before = shapes.accuracy(model, processor, held_in)
    mixture = build_instruction_mixture(mixture_sources(args.seed), processor=processor,
                                        decoder_only=model.config.use_decoder_only_language_model,
                                        num_samples=args.steps * args.batch_size, seed=args.seed)
    print(mixture.sampler.summary())
    freeze_for_instruction_tuning(model)
    training_args = TrainingArguments(
        output_dir=str(output / "trainer"), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate, logging_steps=max(1, args.steps // 4), save_strategy="no", report_to=[],
        seed=args.seed, dataloader_num_workers=0, use_cpu=not torch.cuda.is_available())
    trainer = InstructBlipTrainer(model=model, args=training_args, train_dataset=mixture.dataset,
                                  train_sampler=mixture.sampler, data_collator=mixture.collator)
    losses = [log["loss"] for log in trainer.train() and trainer.state.log_history if "loss" in log]
    after = shapes.accuracy(model, processor, held_in)
    print(f"training loss {losses[0]:.3f} -> {losses[-1]:.3f}; held-in accuracy {before:.2f} -> {after:.2f}")

    model.save_pretrained(output / "model")
    processor.save_pretrained(output / "model")
    reloaded = AutoModel.from_pretrained(output / "model").eval()
    inputs = processor(images=[r["image"] for r in held_in[:4]], text=[r["instruction"] for r in held_in[:4]],
                       return_tensors="pt")
    same = torch.equal(model.eval().generate(**inputs, max_new_tokens=4), reloaded.generate(**inputs, max_new_tokens=4))
    print(f"saved to {output / 'model'}; reloaded with AutoModel as {type(reloaded).__name__}; same answers: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
