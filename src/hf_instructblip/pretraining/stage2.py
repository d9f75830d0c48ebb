"""BLIP-2 stage 2 (generative pretraining with a frozen LLM, LAVIS `blip2_opt.py` / `blip2_t5.py`) as a path through
what the package already has, and its export to transformers' `Blip2ForConditionalGeneration`.

The path: a stage-1 folder (`QFormerForPretraining.save_pretrained` + the Q-Former tokenizer) -> `stage2_model`
(`from_blip2` with `instruction_aware=False`: the Q-Former reads no text, as BLIP-2's) -> `caption_records` ->
`InstructBlipDataCollator` + `InstructBlipTrainer` (`freeze_for_instruction_tuning`: vision encoder and LLM frozen) ->
`export_blip2` (transformers' stage-2 layout) and/or `save_pretrained` (ours). Instruction tuning then starts from
the same model with `config.instruction_aware = True`.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from ..blip2.assembly import FromBlip2Result, from_blip2
from ..blip2.keys import HF_BLIP2_STAGE2_EXPORT_DROPS, HF_BLIP2_STAGE2_EXPORT_RENAMES, map_key
from ..model.validation import check_int
from .configuration import BLIP2_MODEL_TYPE, BLIP2_SUB_TYPES


def stage2_model(stage1: Any, language_model: Any, **from_blip2_kwargs: Any) -> FromBlip2Result:
    """`(model, processor)` for stage 2: `from_blip2(stage1, language_model, ...)` with `instruction_aware=False`.

    Example:
        >>> model, processor = stage2_model("out/stage1", "facebook/opt-2.7b")
    """
    result = from_blip2(stage1, language_model, **from_blip2_kwargs)
    result.model.config.instruction_aware = False
    return result


def caption_records(records: Iterable[Mapping[str, Any]], encoder_decoder: bool, seed: int = 0) -> list[dict]:
    """Image-caption records `{image, caption}` -> collator records `{image, instruction, answer}`.

    Decoder-only LLM: no instruction, the caption is the answer (LAVIS `blip2_opt`: empty prompt). Encoder-decoder
    LLM: the paper's prefix language modelling: the caption is split at a random word boundary (seeded), the prefix
    goes to the encoder (as the instruction), the suffix (at least one word) is the target.

    Example:
        >>> caption_records([{"image": img, "caption": "a red circle"}], encoder_decoder=False)[0]["answer"]
        'a red circle'
    """
    if not isinstance(encoder_decoder, bool):
        raise TypeError(f"`encoder_decoder` must be a bool, found {type(encoder_decoder).__name__}.")
    rng = random.Random(check_int("seed", seed, 0))
    out = []
    for index, record in enumerate(records):
        caption = record.get("caption") if isinstance(record, Mapping) else None
        if not isinstance(caption, str) or not caption.strip() or "image" not in record:
            raise ValueError(f"record {index}: expected a mapping with 'image' and a non-empty str 'caption'.")
        words = caption.split()
        cut = rng.randrange(len(words)) if encoder_decoder else 0
        out.append({"image": record["image"], "instruction": " ".join(words[:cut]), "answer": " ".join(words[cut:])})
    return out


def blip2_config_dict(config: Any) -> dict[str, Any]:
    """Our InstructBLIP config as transformers' BLIP-2 stage-2 `config.json` (no Q-Former text input)."""
    vision, qformer = config.vision_config.to_dict(), config.qformer_config.to_dict()
    return {
        "model_type": BLIP2_MODEL_TYPE, "architectures": ["Blip2ForConditionalGeneration"],
        "vision_config": {**vision, "model_type": BLIP2_SUB_TYPES["vision_config"]},
        "qformer_config": {**qformer, "model_type": BLIP2_SUB_TYPES["qformer_config"], "use_qformer_text_input": False},
        "text_config": config.text_config.to_dict(), "num_query_tokens": config.num_query_tokens,
        "image_token_index": config.image_token_index,
        "use_decoder_only_language_model": config.use_decoder_only_language_model,
    }


def export_blip2(model: Any, folder: str | Path, processor: Any = None) -> Path:
    """Write `model` (ours, BLIP-2-style: `instruction_aware=False`) as a transformers `Blip2ForConditionalGeneration`
    folder: its keys, its config (`image_token_index` = ours, so the same `input_ids` place the queries), the
    Q-Former's text side left out. With `processor`, its LLM tokenizer and image processor are saved too.

    Example:
        >>> export_blip2(model, "out/blip2")
        >>> Blip2ForConditionalGeneration.from_pretrained("out/blip2")
    """
    if getattr(model.config, "instruction_aware", False):
        raise ValueError("export_blip2: the model is instruction-aware (config.instruction_aware=True); BLIP-2's "
                         "Q-Former reads no instruction. Export a stage-2 model (instruction_aware=False).")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for key, tensor in model.state_dict().items():
        new, dropped = map_key(key, HF_BLIP2_STAGE2_EXPORT_RENAMES, HF_BLIP2_STAGE2_EXPORT_DROPS)
        if new is None and dropped is None:
            raise ValueError(f"export_blip2: no BLIP-2 key for {key!r}.")
        if new is not None:
            tensors[new] = tensor.detach().contiguous().clone()  # tied tensors are written apart
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(blip2_config_dict(model.config), indent=2, default=str))
    if processor is not None:
        processor.tokenizer.save_pretrained(folder)
        processor.image_processor.save_pretrained(folder)
    return folder
