"""Convert a LAVIS InstructBLIP checkpoint to a Hugging Face folder (no LAVIS install, no GPU).

Inputs, either:
  1. a full LAVIS state dict (`blip2_t5_instruct` / `blip2_vicuna_instruct`):
        python conversion/convert_lavis_checkpoint.py --checkpoint full.pth --flavour flant5xl --output out/
  2. the released trimmed checkpoint + EVA ViT-g weights + an HF LLM (Hub id or folder):
        python conversion/convert_lavis_checkpoint.py --checkpoint instruct_blip_vicuna7b_trimmed.pth \
            --vit eva_vit_g.pth --llm ./llm/vicuna-7b --flavour vicuna7b --output out/
`--config config.json` replaces `--flavour` (any InstructBlipConfig). The output folder holds sharded
safetensors, `config.json`, `generation_config.json` (LAVIS defaults) and, when tokenizers are given, the
processor. A folder that already holds weights is refused unless `--overwrite` is given (which deletes only those
weight files). `--dry-run` prints the key accounting and writes nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, PretrainedConfig
from transformers.utils.logging import tqdm  # honours transformers' disable_progress_bar()

from hf_instructblip.conversion.checkpoint_io import load_llm, load_state_dict_file
from flavours import FLAVOURS, is_vicuna, lavis_generation_config, model_config_kwargs, text_config_for
from hf_instructblip import InstructBlipConfig, InstructBlipForConditionalGeneration
from hf_instructblip.conversion.lavis_mapping import (
    ConversionError,
    MappingResult,
    TargetSpec,
    compose_lavis_state_dict,
    convert_state_dict,
    detect_layout,
)

DTYPES = ("float32", "bfloat16", "float16")  # torch attribute names
# What `save_pretrained` writes, or an older save left: `from_pretrained` takes model.safetensors before an index,
# so new shards beside an old single file would load the old weights.
WEIGHT_FILES = ("model*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin",
                "pytorch_model.bin.index.json")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="LAVIS .pth (full state dict or trimmed checkpoint)")
    parser.add_argument("--vit", help="EVA ViT-g weights (eva_vit_g.pth), with a trimmed --checkpoint")
    parser.add_argument("--llm", help="HF LLM (Hub id or local folder), with a trimmed --checkpoint")
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--flavour", choices=FLAVOURS, help="released model flavour")
    model.add_argument("--config", help="explicit InstructBlipConfig (config.json file or folder)")
    parser.add_argument("--output", help="output folder (required unless --dry-run)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace model weights already in --output (deletes only those weight files)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32",
                        help="saved dtype (query_tokens stay float32); Flan-T5 needs bfloat16 or float32, not float16")
    parser.add_argument("--max-shard-size", default="5GB", help="safetensors shard size (save_pretrained)")
    parser.add_argument("--dry-run", action="store_true", help="print the key accounting, write nothing")
    parser.add_argument("--verify", action="store_true", help="reload the output and check it (and --reference)")
    parser.add_argument("--reference", help="safetensors file with model inputs and reference `logits`")
    parser.add_argument("--atol", type=float, default=1e-5, help="logit tolerance for --reference")
    parser.add_argument("--qformer-tokenizer", help="Q-Former BERT tokenizer (e.g. bert-base-uncased)")
    parser.add_argument("--llm-tokenizer", help="LLM tokenizer (Flan-T5 / Vicuna)")
    parser.add_argument("--push-to-hub", metavar="REPO", help="upload the output folder to this Hub repo")
    args = parser.parse_args(argv)
    if not args.dry_run and not args.output:
        parser.error("--output is required unless --dry-run is given")
    if bool(args.vit) != bool(args.llm):
        parser.error("--vit and --llm go together (a trimmed checkpoint needs both)")
    if args.reference and not args.verify:
        parser.error("--reference is used by --verify: add --verify")
    return args


# --- path checks (before any weights are read) ----------------------------------------------------------
def check_config_path(config: str) -> None:
    path = Path(config)
    if not (path.is_file() or (path / "config.json").is_file()):
        found = "a folder without config.json" if path.is_dir() else "nothing"
        raise ValueError(f"--config: expected a config.json file or a folder holding one, found {found} at {path}; "
                         f"pass an existing config path or use --flavour.")


def old_weights(output: Path, overwrite: bool) -> list[Path]:
    """The weight files already in `output` (refused unless `overwrite`); `output` must not be a file."""
    if output.exists() and not output.is_dir():
        raise ValueError(f"--output: expected a folder, found a file at {output}; pass a folder path (created "
                         f"if missing).")
    found = sorted({path for pattern in WEIGHT_FILES for path in output.glob(pattern) if path.is_file()})
    if found and not overwrite:
        raise ValueError(f"--output: expected a folder without model weights, found {[p.name for p in found]} in "
                         f"{output}; new weights beside them would not load cleanly. Pass --overwrite to replace "
                         f"them, or choose another folder.")
    return found


# --- config and target ---------------------------------------------------------------------------------
def build_config(
    flavour: str | None, config_path: str | None, llm_config: PretrainedConfig | None
) -> InstructBlipConfig:
    """The HF config: a flavour preset (its LLM part from `llm_config` when given) or an explicit file."""
    if config_path is not None:
        return InstructBlipConfig.from_pretrained(config_path)
    text_config = text_config_for(flavour, llm_config)
    return InstructBlipConfig(**model_config_kwargs(flavour, text_config))


def empty_model(config: InstructBlipConfig) -> InstructBlipForConditionalGeneration:
    """The model on the meta device: shapes and tie structure without allocating weights."""
    with torch.device("meta"):
        return InstructBlipForConditionalGeneration(config)


# --- inputs ----------------------------------------------------------------------------------------------
def load_lavis_state_dict(
    checkpoint: str, vit: str | None, llm_weights: dict[str, torch.Tensor] | None, config: InstructBlipConfig
) -> dict[str, torch.Tensor]:
    """The full LAVIS-layout state dict, composed from the trimmed pieces when they are given."""
    source = load_state_dict_file(checkpoint, "--checkpoint")
    layout = detect_layout(source)
    if vit is None:
        if layout == "trimmed":
            raise ValueError(
                "--checkpoint: this is a trimmed InstructBLIP checkpoint (Q-Former side only, no ViT or LLM "
                "weights); pass --vit (eva_vit_g.pth) and --llm (HF LLM) as well."
            )
        return source
    vit_weights = load_state_dict_file(vit, "--vit")
    return compose_lavis_state_dict(source, vit_weights, llm_weights, config.use_decoder_only_language_model)


def cast_state_dict(state_dict: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Floating tensors to `dtype` (query_tokens kept float32, as the model keeps them); tied tensors stay shared."""
    cast: dict[int, torch.Tensor] = {}
    out = {}
    for key, value in tqdm(state_dict.items(), desc=f"casting to {dtype}", leave=False):
        target = torch.float32 if key == "query_tokens" else dtype
        if not value.is_floating_point() or value.dtype == target:
            out[key] = value
            continue
        if (id(value), target) not in cast:
            cast[id(value), target] = value.to(target)
        out[key] = cast[id(value), target]
    return out


# --- outputs ---------------------------------------------------------------------------------------------
def build_model(
    config: InstructBlipConfig, state_dict: dict[str, torch.Tensor], spec: TargetSpec
) -> InstructBlipForConditionalGeneration:
    """The model holding exactly `state_dict` (assigned, not copied; memory-mapped tensors stay mapped)."""
    model = empty_model(config)
    model.load_state_dict(state_dict, strict=True, assign=True)
    # `assign` wraps every key in its own Parameter. Keys given one tensor share one Parameter again; keys given
    # distinct tensors (Flan-T5's own LM head) stay distinct, as `from_pretrained` leaves them.
    for alias, canonical in spec.tied.items():
        if state_dict[alias] is state_dict[canonical]:
            module_path, _, name = alias.rpartition(".")
            setattr(model.get_submodule(module_path), name, model.get_parameter(canonical))
    return model.eval()


def save_folder(model: InstructBlipForConditionalGeneration, output: Path, max_shard_size: str) -> None:
    model.generation_config = lavis_generation_config(model.config.text_config, model.config.image_token_index)
    model.save_pretrained(output, max_shard_size=max_shard_size)


def build_processor(config: InstructBlipConfig, flavour: str | None, qformer_tok: str | None,
                    llm_tok: str | None) -> tuple[object | None, str]:
    """The processor (None when it cannot be built) and a line saying what happened, for the CLI to print.

    Built before anything is written, so a tokenizer that does not fit the config leaves no half output.
    """
    if not (qformer_tok and llm_tok):
        return None, "processor: skipped (pass --qformer-tokenizer and --llm-tokenizer to write it)"
    from hf_instructblip.blip2.assembly import lavis_image_processor
    from hf_instructblip.model.processing import InstructBlipProcessor

    qformer_tokenizer = AutoTokenizer.from_pretrained(qformer_tok, truncation_side="left")
    if "[DEC]" not in qformer_tokenizer.get_vocab():
        qformer_tokenizer.add_special_tokens({"bos_token": "[DEC]"})  # LAVIS's Q-Former tokenizer adds it
    tokenizer = AutoTokenizer.from_pretrained(llm_tok, truncation_side="left")
    if flavour is not None and is_vicuna(flavour):  # LAVIS: "[PAD]" (32000); "</s>" as bos, eos and unk
        tokenizer.add_special_tokens(
            {"pad_token": "[PAD]", "bos_token": "</s>", "eos_token": "</s>", "unk_token": "</s>"}
        )
    image_processor = lavis_image_processor(config.vision_config.image_size)  # bicubic resize, CLIP mean/std
    processor = InstructBlipProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                      qformer_tokenizer=qformer_tokenizer, num_query_tokens=config.num_query_tokens)
    if processor.image_token_id != config.image_token_index:
        raise ValueError(
            f"--llm-tokenizer: the image token {processor.image_token!r} gets id {processor.image_token_id}, but "
            f"config.image_token_index is {config.image_token_index}; pass the LLM's own tokenizer."
        )
    if len(qformer_tokenizer) > config.qformer_config.vocab_size:
        raise ValueError(
            f"--qformer-tokenizer: {len(qformer_tokenizer)} tokens do not fit the Q-Former vocabulary of "
            f"{config.qformer_config.vocab_size} rows."
        )
    return processor, "processor: written (Q-Former tokenizer with [DEC], left truncation; LLM tokenizer)"


def verify(output: Path, converted: dict[str, torch.Tensor], reference: str | None, atol: float) -> str:
    """Reload `output`: every tensor must equal the converted one, and logits must match `reference`."""
    model = InstructBlipForConditionalGeneration.from_pretrained(output).eval()
    reloaded = model.state_dict()
    differ = [key for key, value in converted.items() if not torch.equal(reloaded[key], value)]
    if differ:
        raise ConversionError(f"--verify: {len(differ)} tensors changed on save/reload: {differ[:10]}")
    if reference is None:
        return f"verify: {len(converted)} tensors reload bit-exactly (no --reference logits given)"
    error = check_reference_logits(model, reference, atol)
    return f"verify: reload bit-exact; logits match the reference (max abs diff {error:.3g} <= {atol:g})"


def check_reference_logits(model: InstructBlipForConditionalGeneration, reference: str | Path, atol: float) -> float:
    """Max |logits - reference logits| for the inputs stored in `reference` (a safetensors file holding the
    model's keyword inputs, e.g. `pixel_values`, `qformer_input_ids`, `input_ids`, and `logits`)."""
    inputs = load_file(reference)
    if "logits" not in inputs:
        raise ValueError(f"--reference: expected a 'logits' tensor in {reference}, found {sorted(inputs)}.")
    expected = inputs.pop("logits")
    with torch.no_grad():
        logits = model(**inputs).logits
    if logits.shape != expected.shape:
        raise ConversionError(f"--verify: logits shape {list(logits.shape)} != reference {list(expected.shape)}")
    error = (logits.float() - expected.float()).abs().max().item()
    if error > atol:
        raise ConversionError(f"--verify: logits differ from the reference by {error:.3g} (> atol {atol:g})")
    return error


# --- the whole conversion ----------------------------------------------------------------------------------
def convert(args: argparse.Namespace) -> MappingResult:
    if args.config is not None:
        check_config_path(args.config)
    stale = [] if args.dry_run else old_weights(Path(args.output), args.overwrite)
    llm_weights, llm_config = load_llm(args.llm) if args.llm else (None, None)
    config = build_config(args.flavour, args.config, llm_config)
    source = load_lavis_state_dict(args.checkpoint, args.vit, llm_weights, config)
    spec = TargetSpec.from_model(empty_model(config))
    result = convert_state_dict(source, spec, strict=not args.dry_run, progress=True)
    if args.dry_run:
        print(result.summary())
        return result
    output = Path(args.output)
    processor, processor_note = build_processor(config, args.flavour, args.qformer_tokenizer, args.llm_tokenizer)
    converted = cast_state_dict(result.state_dict, getattr(torch, args.dtype))
    for path in stale:  # only now: a conversion that fails leaves the old model intact
        path.unlink()
    save_folder(build_model(config, converted, spec), output, args.max_shard_size)
    print(f"model: {len(converted)} tensors written to {output}")
    if processor is not None:
        processor.save_pretrained(output)
    print(processor_note)
    if args.verify:
        print(verify(output, converted, args.reference, args.atol))
    if args.push_to_hub:
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(args.push_to_hub, exist_ok=True)
        api.upload_folder(folder_path=output, repo_id=args.push_to_hub)
        print(f"pushed to https://huggingface.co/{args.push_to_hub}")
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = convert(args)
    except ValueError as err:  # ConversionError included: a clear message, no traceback
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 1 if args.dry_run and result.problems else 0


if __name__ == "__main__":
    sys.exit(main())
