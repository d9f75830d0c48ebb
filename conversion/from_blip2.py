"""Make a new InstructBLIP folder from a BLIP-2, an LLM and a Q-Former text side (`hf_instructblip.blip2.from_blip2`).

    python conversion/from_blip2.py --blip2 Salesforce/blip2-flan-t5-xl --language-model Qwen/Qwen2.5-7B-Instruct \
        --qformer-text bert-base-uncased --dtype bfloat16 --output out/
    python conversion/from_blip2.py --blip2 Salesforce/blip2-itm-vit-g --language-model ./my-llm --output out/

The folder holds the weights (safetensors), config.json, the processor, and generation_config.json with LAVIS's
defaults (the image placeholder suppressed). It prints where every group of weights came from, and which are new.
A folder that already holds weights is refused.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from flavours import lavis_generation_config
from hf_instructblip import from_blip2

DTYPES = ("float32", "bfloat16", "float16")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blip2", required=True, help="transformers BLIP-2 folder / Hub id, or a LAVIS BLIP-2 .pth")
    parser.add_argument("--language-model", required=True, help="causal or seq2seq LM folder / Hub id")
    parser.add_argument("--qformer-text", help="BERT or stage-1 BLIP-2 for the Q-Former text side "
                                               "(default: --blip2's own, when it is stage 1)")
    parser.add_argument("--blip2-config", help="LAVIS .pth only: a BLIP-2 config (folder, id or config.json folder)")
    parser.add_argument("--vit", help="LAVIS .pth only: EVA ViT-g weights (eva_vit_g.pth) when the .pth lacks them")
    parser.add_argument("--tokenizer", help="LLM tokenizer (default: --language-model's)")
    parser.add_argument("--qformer-tokenizer", help="Q-Former tokenizer (default: the text side's)")
    parser.add_argument("--dtype", choices=DTYPES, help="LLM and vision encoder dtype (Q-Former stays float32)")
    parser.add_argument("--seed", type=int, default=0, help="seed of a new projection")
    parser.add_argument("--output", required=True, help="output folder")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    output = Path(args.output)
    if output.is_dir() and any(output.glob("*.safetensors")):
        print(f"error: --output: expected a folder without model weights, found some in {output}", file=sys.stderr)
        return 1
    try:
        result = from_blip2(
            args.blip2, args.language_model, args.qformer_text, tokenizer=args.tokenizer,
            qformer_tokenizer=args.qformer_tokenizer, blip2_config=args.blip2_config, vit=args.vit,
            dtype=getattr(torch, args.dtype) if args.dtype else None, seed=args.seed)
    except ValueError as err:  # bad sources: a clear message, no traceback
        print(f"error: {err}", file=sys.stderr)
        return 1
    model, processor = result
    model.generation_config = lavis_generation_config(model.config.text_config, model.config.image_token_index)
    model.save_pretrained(output)
    processor.save_pretrained(output)
    print(result.provenance.summary())
    print(f"written to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
