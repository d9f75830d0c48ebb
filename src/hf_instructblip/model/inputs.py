"""Checks of the model's inputs, made before any work is spent: every error names the argument, what was expected,
what was found and the fix, where torch would otherwise fail deep inside (or worse, return a wrong result).

Checks that read tensor values (placeholder counts, finite pixels, label ids) synchronise with the device; they
are skipped while `torch.compile` / `torch.export` trace the model, whose graphs cannot branch on values.
"""

from __future__ import annotations

import torch
from transformers import PretrainedConfig


def reads_values() -> bool:
    """Whether value-dependent checks run: always, except under compile / export tracing."""
    return not torch.compiler.is_compiling()


def _shape(value: object) -> object:
    return list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__


def check_pixel_values(pixel_values: torch.Tensor, image_size: int, patch_size: int, interpolate: bool) -> None:
    """Normalised float pixels `[B, 3, H, W]` of the configured size (any size of at least one patch with
    `interpolate`), all finite."""
    if not isinstance(pixel_values, torch.Tensor):
        raise TypeError(f"`pixel_values` must be a torch.Tensor, found {type(pixel_values).__name__}.")
    if pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
        raise ValueError(f"`pixel_values` must have shape [batch, 3, height, width], found {_shape(pixel_values)}.")
    if not pixel_values.is_floating_point():
        raise TypeError(f"`pixel_values` must be normalised floats, found dtype {pixel_values.dtype} (raw image "
                        "values?); make them with the processor (`processor(images=...)['pixel_values']`).")
    height, width = pixel_values.shape[-2:]
    if not interpolate and (height, width) != (image_size, image_size):
        raise ValueError(f"`pixel_values` must be {image_size}x{image_size} (vision_config.image_size), found "
                         f"{height}x{width}; resize the images or pass `interpolate_pos_encoding=True`.")
    if min(height, width) < patch_size:
        raise ValueError(f"`pixel_values` must be at least one patch ({patch_size}x{patch_size}) in size, found "
                         f"{height}x{width}.")
    if reads_values() and not torch.isfinite(pixel_values).all():
        raise ValueError("`pixel_values` holds NaN or infinite values; check the images and their preprocessing.")


def check_batch(**tensors: torch.Tensor | None) -> None:
    """Every given tensor has the same batch size: one prompt, instruction and label row per image."""
    sizes = {name: value.shape[0] for name, value in tensors.items() if isinstance(value, torch.Tensor)}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"The inputs disagree on the batch size (found {sizes}): give one prompt, Q-Former "
                         "instruction and label row per image (the processor pairs one image with every prompt).")


def check_mask(name: str, mask: torch.Tensor | None, ids: torch.Tensor | None, ids_name: str) -> None:
    """An attention mask has its ids' shape: a mismatched mask would silently mask other positions."""
    if mask is not None and ids is not None and mask.shape != ids.shape:
        raise ValueError(f"`{name}` must have the shape of `{ids_name}` {_shape(ids)}, found {_shape(mask)}.")


def check_length(name: str, ids: torch.Tensor | None, limit: int | None, owner: str, fix: str) -> None:
    """At most `limit` positions (the learned position table's size; `owner` says whose, and where it is set)."""
    if ids is not None and limit is not None and ids.shape[-1] > limit:
        raise ValueError(f"`{name}` holds {ids.shape[-1]} positions, more than the {limit} {owner}; {fix}.")


def check_qformer_length(ids: torch.Tensor | None, config: PretrainedConfig) -> None:
    """The Q-Former instruction fits the Q-Former's position table (`config`: its own config)."""
    check_length("qformer_input_ids", ids, config.max_position_embeddings,
                 "of the Q-Former (qformer_config.max_position_embeddings)",
                 "tokenize the instruction with `qformer_max_length` at most that (the processor truncates)")


def check_labels(labels: torch.Tensor, input_ids: torch.Tensor | None, vocab_size: int, decoder_only: bool) -> None:
    """Decoder-only labels align with `input_ids`; every label is -100 or a vocabulary id."""
    if not isinstance(labels, torch.Tensor) or labels.dim() != 2 or labels.is_floating_point():
        raise ValueError(f"`labels` must be an integer tensor [batch, length], found {_shape(labels)}.")
    if decoder_only and input_ids is not None and labels.shape != input_ids.shape:
        raise ValueError(f"`labels` must have the shape of `input_ids` {_shape(input_ids)} (a decoder-only LLM "
                         f"scores the prompt positions, shifted by one), found {_shape(labels)}.")
    if reads_values():
        bad = ((labels < 0) & (labels != -100)) | (labels >= vocab_size)
        if bad.any():
            found = sorted(set(labels[bad].tolist()))[:5]
            raise ValueError(f"`labels` must be -100 (ignored) or ids below the LLM vocabulary size {vocab_size}, "
                             f"found {found}.")


def image_placeholder_mask(config: PretrainedConfig, input_ids: torch.Tensor | None, batch: int, tokens: int,
                           vocab_size: int) -> torch.Tensor:
    """Boolean `[B, L]` mask of the image placeholders in `input_ids`, checked to hold exactly `tokens` per row, one
    per soft visual token (`num_query_tokens` per image; transformers' InstructBLIP would silently drop the image
    or some queries)."""
    token = config.image_token_index
    if token is None:
        raise ValueError("config.image_token_index is unset, so the image cannot be placed in the prompt. Set it to "
                         "the id of the image placeholder token of the LLM tokenizer (the processor adds one).")
    if not 0 <= token < vocab_size:
        raise ValueError(f"config.image_token_index ({token}) is not a row of the LLM's {vocab_size}-row embedding; "
                         "call `sync_image_token(model, processor)`, which resizes the embeddings to the tokenizer.")
    if input_ids is None:
        raise ValueError("`input_ids` is required: it carries the image placeholder tokens.")
    if input_ids.dim() != 2 or input_ids.shape[0] != batch:
        raise ValueError(f"`input_ids` must have shape [{batch}, length] to match the {batch} images, found "
                         f"{_shape(input_ids)}.")
    mask = input_ids == token
    if reads_values():  # a host sync; under compile / export tracing the processor's layout is trusted
        wrong = {row: n for row, n in enumerate(mask.sum(dim=1).tolist()) if n != tokens}
        if wrong:
            raise ValueError(f"Each row of `input_ids` must hold exactly {tokens} image placeholder tokens (id "
                             f"{token}; num_query_tokens={config.num_query_tokens} per image); found (row: count) "
                             f"{wrong}. Build inputs with the InstructBlipProcessor.")
    return mask


def check_call(config: PretrainedConfig, input_ids: torch.Tensor | None, **others: torch.Tensor | None) -> None:
    """One `forward` / `generate` call: batch sizes, mask shapes, sequence lengths and labels."""
    pixel_values = others.get("pixel_values")
    if isinstance(pixel_values, torch.Tensor) and pixel_values.dim() < 4:  # else its first size reads as a batch
        raise ValueError(f"`pixel_values` must be [batch, channels, height, width] (clips: [batch, frames, channels, "
                         f"height, width]), found rank {pixel_values.dim()} {_shape(pixel_values)}; add the batch "
                         "dimension (`pixel_values[None]`) or build it with the processor.")
    check_batch(input_ids=input_ids, **others)
    check_mask("attention_mask", others.get("attention_mask"), input_ids, "input_ids")
    qformer_ids = others.get("qformer_input_ids")
    check_mask("qformer_attention_mask", others.get("qformer_attention_mask"), qformer_ids, "qformer_input_ids")
    check_qformer_length(qformer_ids, config.qformer_config)
    check_length("input_ids", input_ids, getattr(config.text_config, "max_position_embeddings", None),
                 "of the LLM (text_config.max_position_embeddings)", "pass `truncation=True, max_length=...` to the "
                 "processor")
    if others.get("labels") is not None:
        check_labels(others["labels"], input_ids, config.text_config.vocab_size, config.use_decoder_only_language_model)
