"""`from_blip2`: a new InstructBLIP from a pretrained BLIP-2 and any LLM, as the paper starts instruction tuning.

Where each part comes from (LAVIS's recipe: BERT, then the BLIP-2 stage-2 checkpoint loaded over it):
- vision encoder, query tokens, the Q-Former's LayerNorm, shared layers and query feed-forward: `blip2`;
- the Q-Former's text side (word / position embeddings, each layer's text feed-forward), which stage 2 deleted:
  `qformer_text` (BERT or a stage-1 BLIP-2), or `blip2` itself when it is stage 1;
- the projection: `blip2`'s when it maps to the LLM's width, else new (see `new_projection`);
- the LLM: `language_model`, unchanged (rows for the image placeholder appended when its tokenizer lacks one).
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from transformers import AutoImageProcessor, AutoTokenizer, BlipImageProcessor, PreTrainedTokenizerBase
from transformers.utils import logging
from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from ..conversion.lavis_mapping import append_vocab_rows
from ..model.configuration import InstructBlipConfig
from ..model.modeling import InstructBlipForConditionalGeneration
from ..model.processing import QFORMER_MAX_LENGTH, InstructBlipProcessor, sync_image_token
from .keys import is_text_side
from .language_model import check_language_model, load_language_model
from .provenance import NEW, Provenance
from .sources import SourceWeights, read_blip2, read_text_side

logger = logging.get_logger(__name__)
KEEP_FP32 = ("query_tokens", "qformer.", "language_projection.")  # as the model's `_keep_in_fp32_modules`


class FromBlip2Result(tuple):
    """`(model, processor)`, so `model, processor = from_blip2(...)` works; `.provenance` holds the report."""

    def __new__(cls, model, processor, provenance: Provenance):
        result = super().__new__(cls, (model, processor))
        result.provenance = provenance
        return result

    @property
    def model(self) -> InstructBlipForConditionalGeneration:
        return self[0]

    @property
    def processor(self) -> InstructBlipProcessor:
        return self[1]


def from_blip2(
    blip2: Any,
    language_model: Any,
    qformer_text: Any = None,
    *,
    tokenizer: Any = None,
    qformer_tokenizer: Any = None,
    image_processor: Any = None,
    blip2_config: Any = None,
    vit: str | None = None,
    dtype: torch.dtype | None = None,
    seed: int = 0,
) -> FromBlip2Result:
    """A new InstructBLIP (`instruction_aware=True`) and its processor from a BLIP-2, an LLM and a text side.

    `blip2`: a transformers BLIP-2 folder / Hub id (Blip2ForConditionalGeneration, Blip2Model: stage 2;
    Blip2ForImageTextRetrieval: stage 1) or a LAVIS BLIP-2 `.pth` (+ `blip2_config` for its head counts, `vit`
    when it was saved without its EVA ViT). `language_model`: a causal or seq2seq LM (folder, Hub id or model).
    `qformer_text`: BERT (folder, id or model) or a stage-1 BLIP-2; default: `blip2`'s own text side.
    Tokenizers and image processor default to the sources' own (the Q-Former tokenizer is the text side's);
    `dtype` is the LLM's and vision encoder's (the Q-Former, queries and projection stay float32); `seed` seeds a
    new projection.

    Example:
        >>> model, processor = result = from_blip2("Salesforce/blip2-flan-t5-xl", "Qwen/Qwen2.5-7B-Instruct",
        ...                                        "bert-base-uncased", dtype=torch.bfloat16)
        >>> print(result.provenance.summary())
    """
    check_language_model(language_model)  # a bad LLM fails before any weights are read
    provenance = Provenance()
    source = read_blip2(blip2, "blip2", blip2_config, vit)
    provenance.sources["blip2"] = source.description
    text = _text_side(source, qformer_text, provenance)
    llm = load_language_model(language_model, dtype)
    provenance.sources["language_model"] = f"{type(llm).__name__} {llm.name_or_path or '(built)'}"
    qformer_tokenizer = _tokenizer(qformer_tokenizer or text.folder, "qformer_tokenizer", text.description)
    tokenizer = _tokenizer(tokenizer or (None if isinstance(language_model, torch.nn.Module) else language_model),
                           "tokenizer", "a built `language_model`")
    _fit_vocabulary(text, len(qformer_tokenizer), provenance)

    qformer_config = {**source.config["qformer_config"], "vocab_size": _rows(text, "word"),
                      "max_position_embeddings": _rows(text, "position")}
    config = InstructBlipConfig(vision_config=source.config["vision_config"], qformer_config=qformer_config,
                                text_config=llm.config, num_query_tokens=source.config["num_query_tokens"])
    with torch.device("meta"):  # shapes only: the tensors below are assigned, not copied
        model = InstructBlipForConditionalGeneration(config)
    model.language_model = llm
    tensors = {**_owned(source, provenance), **_owned(text, provenance)}
    tensors.update(_projection(source, model, llm, seed, provenance))
    _load(model, _cast(tensors, dtype), provenance)

    processor = InstructBlipProcessor(
        image_processor or _image_processor(source, config.vision_config.image_size), tokenizer, qformer_tokenizer,
        num_query_tokens=config.num_query_tokens, qformer_max_length=min(QFORMER_MAX_LENGTH, qformer_config[
            "max_position_embeddings"]))
    _check_image_size(processor.image_processor, config.vision_config.image_size)
    _sync_placeholder(model, processor, provenance)
    provenance.add("language_model", {f"language_model.{key}": key for key in llm.state_dict()})
    missing = provenance.unaccounted(model.state_dict())
    if missing:
        raise RuntimeError(f"from_blip2: tensors without a source: {missing[:10]}")
    logger.info("from_blip2 provenance:\n%s", provenance.summary())
    return FromBlip2Result(model.eval(), processor, provenance)


def _text_side(source: SourceWeights, qformer_text: Any, provenance: Provenance) -> SourceWeights:
    """The text side to use: `qformer_text`'s (replacing any in `blip2`), or `blip2`'s own (stage 1)."""
    if qformer_text is None:
        if not source.has_text_side:
            raise ValueError(
                f"`qformer_text` is required: `blip2` ({source.description}) is a stage-2 BLIP-2 without the Q-Former's "
                f"text side (word embeddings, text feed-forward). Pass qformer_text='bert-base-uncased' (LAVIS's "
                f"choice) or a stage-1 BLIP-2 such as 'Salesforce/blip2-itm-vit-g'.")
        text = SourceWeights("blip2", source.description, folder=source.folder)
        for key in [k for k in source.tensors if is_text_side(k)]:
            text.tensors[key], text.origin[key] = source.tensors.pop(key), source.origin.pop(key)
        return text
    text = read_text_side(qformer_text, source.config["qformer_config"])
    provenance.sources["qformer_text"] = text.description
    for key in [k for k in source.tensors if is_text_side(k)]:
        source.tensors.pop(key)
        source.dropped[source.origin.pop(key)] = "Q-Former text side: replaced by `qformer_text`"
    return text


def _owned(part: SourceWeights, provenance: Provenance) -> dict[str, torch.Tensor]:
    provenance.add(part.role, part.origin)
    provenance.dropped.setdefault(part.role, {}).update(part.dropped)
    return part.tensors


def _rows(text: SourceWeights, which: str) -> int:
    return text.tensors[f"qformer.embeddings.{which}_embeddings.weight"].shape[0]


def _tokenizer(source: Any, name: str, where: str) -> PreTrainedTokenizerBase:
    """A tokenizer given as is, or loaded from a folder / Hub id (str or path)."""
    if isinstance(source, PreTrainedTokenizerBase):
        return source
    if source is not None and not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"`{name}`: expected a tokenizer, a folder or a Hub id, found {type(source).__name__}.")
    try:
        if source is not None:
            return AutoTokenizer.from_pretrained(str(source))
    except (OSError, ValueError, TypeError):
        where = str(source)
    raise ValueError(f"`{name}`: no tokenizer could be loaded from {where}; pass `{name}=` explicitly.")


def _fit_vocabulary(text: SourceWeights, tokens: int, provenance: Provenance) -> None:
    """Append rows for Q-Former tokens beyond the word embeddings (e.g. LAVIS's `[DEC]`): the mean of the source
    rows, deterministic; the source's own rows are kept as they are."""
    key = "qformer.embeddings.word_embeddings.weight"
    rows = text.tensors[key].shape[0]
    if tokens > rows:
        text.tensors[key] = append_vocab_rows(text.tensors[key], tokens - rows)
        provenance.notes.append(f"{key}: rows {rows}..{tokens - 1} appended for the Q-Former tokenizer's extra "
                                f"tokens (mean of the {rows} source rows)")


def new_projection(qformer_width: int, embeddings: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """A new Q-Former -> LLM projection `(weight [D_llm, D_q], bias [D_llm], how)`.

    weight ~ N(0, rms(E) / sqrt(D_q)), bias 0, with E the LLM's input embeddings: the Q-Former output is LayerNorm'd
    (about unit variance per element), so the soft visual tokens start at the scale of the LLM's own word
    embeddings. Embedding scales differ by orders of magnitude between LLMs (T5 ~ 10, Llama ~ 0.01), so a fixed
    std (transformers' 0.02) would start far too loud for one and too quiet for the other.
    """
    rms = embeddings.detach().float().pow(2).mean().sqrt().item()
    std = rms / math.sqrt(qformer_width)
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(embeddings.shape[1], qformer_width, generator=generator) * std  # [D_llm, D_q]
    how = f"N(0, {std:.4g}) = rms of the LLM input embeddings / sqrt({qformer_width}), seed {seed}; bias 0"
    return weight, torch.zeros(embeddings.shape[1]), how


def _projection(source: SourceWeights, model, llm, seed: int, provenance: Provenance) -> dict[str, torch.Tensor]:
    expected = tuple(model.language_projection.weight.shape)  # [D_llm, D_q]
    given = source.tensors.pop("language_projection.weight", None)
    bias = source.tensors.pop("language_projection.bias", None)
    if given is not None and tuple(given.shape) == expected:
        provenance.add("blip2", {f"language_projection.{n}": source.origin[f"language_projection.{n}"]
                                 for n in ("weight", "bias")})
        return {"language_projection.weight": given, "language_projection.bias": bias}
    if given is not None:
        for name in ("weight", "bias"):
            source.dropped[source.origin.pop(f"language_projection.{name}")] = (
                f"projection to width {given.shape[0]} (BLIP-2's LLM); this LLM's is {expected[0]}: a new one is made")
    weight, bias, how = new_projection(expected[1], llm.get_input_embeddings().weight, seed)
    provenance.origin["language_projection.weight"] = (NEW, how)
    provenance.origin["language_projection.bias"] = (NEW, "zeros")
    return {"language_projection.weight": weight, "language_projection.bias": bias}


def _cast(tensors: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Q-Former, queries and projection in float32 (as the model keeps them); the vision encoder in `dtype`."""
    out = {}
    for key, tensor in tensors.items():
        target = torch.float32 if key.startswith(KEEP_FP32) else dtype or tensor.dtype
        out[key] = tensor.to(target) if tensor.is_floating_point() else tensor
    return out


def _load(model, tensors: dict[str, torch.Tensor], provenance: Provenance) -> None:
    """Assign every non-LLM tensor, after checking that each fits and that none is missing."""
    shapes = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    wrong = [f"{key} (from {provenance.origin.get(key, ('?', '?'))[1]}): expected {list(shapes[key])}, found "
             f"{list(value.shape)}" for key, value in tensors.items() if key in shapes and tuple(value.shape) != shapes[key]]
    unknown = sorted(set(tensors) - set(shapes))
    missing = sorted(key for key in shapes if key not in tensors and not key.startswith("language_model."))
    if wrong or unknown or missing:
        raise ValueError(f"The sources do not fit one InstructBLIP: wrong shapes {wrong[:5]}, keys the model lacks "
                         f"{unknown[:5]}, keys no source gives {missing[:5]}.")
    model.load_state_dict(tensors, strict=False, assign=True)


def _image_processor(source: SourceWeights, image_size: int):
    """`blip2`'s own image processor, else LAVIS's evaluation transform (bicubic resize, CLIP mean / std)."""
    if source.folder is not None and (source.folder / "preprocessor_config.json").is_file():
        return AutoImageProcessor.from_pretrained(str(source.folder))
    return lavis_image_processor(image_size)


def lavis_image_processor(image_size: int) -> BlipImageProcessor:
    """LAVIS's evaluation transform as transformers' BLIP image processor: bicubic resize, CLIP mean / std."""
    return BlipImageProcessor(size={"height": image_size, "width": image_size}, image_mean=OPENAI_CLIP_MEAN,
                              image_std=OPENAI_CLIP_STD)


def _check_image_size(image_processor, image_size: int) -> None:
    size = getattr(image_processor, "size", None) or {}
    found = (size.get("height"), size.get("width")) if hasattr(size, "get") else None
    if found and None not in found and found != (image_size, image_size):
        raise ValueError(f"`image_processor`: expected images resized to the vision encoder's {image_size} x "
                         f"{image_size}, found {found[0]} x {found[1]}.")


def _sync_placeholder(model, processor, provenance: Provenance) -> None:
    """Give the LLM the processor's image token; rows appended for it are the mean of the existing rows
    (deterministic; the placeholder's input row is never read: image features replace it)."""
    rows = model.get_input_embeddings().weight.shape[0]
    if not sync_image_token(model, processor):
        return
    with torch.no_grad():
        for module in {id(m): m for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m}.values():
            added = module.weight.shape[0] - rows
            module.weight[rows:] = append_vocab_rows(module.weight[:rows], added)[rows:]  # the converter's rule
    provenance.notes.append(f"language model embeddings: rows {rows}..{model.get_input_embeddings().weight.shape[0] - 1}"
                            f" appended for {processor.image_token!r} (mean of the existing rows)")
