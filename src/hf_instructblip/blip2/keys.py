"""Key layouts a BLIP-2 start reads, mapped to ours, and the weight groups of the result.

Every table entry is (pattern, template or reason); patterns are anchored and the first match wins. Keys are
ours (`hf_instructblip.model`, = transformers' InstructBLIP layout) after mapping. LAVIS keys go through the
converter's table (`conversion.lavis_mapping`); only BLIP-2's extra LAVIS keys are listed here.

Example:
    >>> map_key("qformer.layernorm.weight", HF_BLIP2_RENAMES, HF_BLIP2_DROPS)
    ('qformer.embeddings.layernorm.weight', None)
"""

from __future__ import annotations

import re

# transformers' Blip2ForConditionalGeneration / Blip2Model / Blip2ForImageTextRetrieval -> ours.
HF_BLIP2_RENAMES: tuple[tuple[str, str], ...] = (
    (r"query_tokens", "query_tokens"),
    (r"vision_model\.(.+)", r"vision_model.\1"),  # same EVA layout, qkv bias already fused
    # BLIP-2 applies its Q-Former LayerNorm to [queries; text] embeddings, as our embeddings' LayerNorm does.
    (r"qformer\.layernorm\.(weight|bias)", r"qformer.embeddings.layernorm.\1"),
    (r"qformer\.encoder\.(.+)", r"qformer.encoder.\1"),
    # Blip2ForImageTextRetrieval keeps the Q-Former's text embeddings at the top level.
    (r"embeddings\.(word_embeddings|position_embeddings)\.weight", r"qformer.embeddings.\1.weight"),
    (r"language_projection\.(weight|bias)", r"language_projection.\1"),
)
HF_BLIP2_DROPS: tuple[tuple[str, str], ...] = (
    (r"language_model\..+", "BLIP-2's own LLM: the LLM comes from `language_model`"),
    (r"(?:vision_projection|text_projection|itm_head)\..+",
     "stage-1 contrastive / matching head (ITC, ITM): not part of InstructBLIP"),
    (r"(?:qformer\.)?embeddings\.position_ids", "position-id buffer: recomputed"),
    (r"temp|itg_head\..+", "stage-1 temperature / ITG head of `pretraining.QFormerForPretraining`: not part of "
     "InstructBLIP"),
)

# Ours -> transformers' Blip2ForConditionalGeneration (stage 2: BLIP-2 deleted the Q-Former's text side).
HF_BLIP2_STAGE2_EXPORT_RENAMES: tuple[tuple[str, str], ...] = (
    (r"qformer\.embeddings\.layernorm\.(weight|bias)", r"qformer.layernorm.\1"),
    (r"(query_tokens|vision_model\..+|qformer\.encoder\..+|language_projection\..+|language_model\..+)", r"\1"),
)
HF_BLIP2_STAGE2_EXPORT_DROPS: tuple[tuple[str, str], ...] = (
    (r"qformer\.embeddings\.(?:word|position)_embeddings\.weight|qformer\.encoder\.layer\.\d+\.(?:intermediate|output)\."
     r"(?:dense|LayerNorm)\.(?:weight|bias)", "the Q-Former's text side: not in BLIP-2 stage 2 (its queries never read "
     "text)"),
)

# LAVIS BLIP-2 keys the InstructBLIP converter does not know (checked before `lavis_mapping`'s own rules).
LAVIS_BLIP2_DROPS: tuple[tuple[str, str], ...] = (
    (r"(?:opt_model|t5_model|llm_model)\..+", "BLIP-2's own LLM: the LLM comes from `language_model`"),
    (r"(?:vision_proj|text_proj|itm_head)\..+", "stage-1 contrastive / matching head (ITC, ITM): not part of InstructBLIP"),
    (r"temp", "stage-1 contrastive temperature: not part of InstructBLIP"),
)

# A BERT base model (`AutoModel` of a BERT folder: no `bert.` prefix) -> the Q-Former's text side.
BERT_TEXT_RENAMES: tuple[tuple[str, str], ...] = (
    (r"embeddings\.(word_embeddings|position_embeddings)\.weight", r"qformer.embeddings.\1.weight"),
    (r"encoder\.layer\.(\d+)\.intermediate\.dense\.(weight|bias)", r"qformer.encoder.layer.\1.intermediate.dense.\2"),
    (r"encoder\.layer\.(\d+)\.output\.(dense|LayerNorm)\.(weight|bias)", r"qformer.encoder.layer.\1.output.\2.\3"),
)
BERT_TEXT_DROPS: tuple[tuple[str, str], ...] = (
    (r"embeddings\.token_type_embeddings\.weight", "token-type embeddings: the Q-Former has none (as LAVIS's)"),
    (r"encoder\.layer\.\d+\.attention\..+|embeddings\.LayerNorm\..+",
     "BERT's attention and embedding LayerNorm: the Q-Former's come from BLIP-2 (LAVIS loads stage 2 over BERT)"),
    (r"pooler\..+|embeddings\.position_ids", "BERT pooler / position-id buffer: not used by the Q-Former"),
)

# The Q-Former's text side: what BLIP-2 stage 2 deleted and InstructBLIP takes from BERT or stage 1.
TEXT_SIDE = re.compile(r"qformer\.embeddings\.(?:word|position)_embeddings\.weight"
                       r"|qformer\.encoder\.layer\.\d+\.(?:intermediate|output)\..+")
GROUPS: tuple[tuple[str, re.Pattern], ...] = (
    ("vision encoder", re.compile(r"vision_model\..+")),
    ("query tokens", re.compile(r"query_tokens")),
    ("Q-Former text side", TEXT_SIDE),
    ("Q-Former (shared layers, query feed-forward, LayerNorm)", re.compile(r"qformer\..+")),
    ("projection", re.compile(r"language_projection\..+")),
    ("language model", re.compile(r"language_model\..+")),
)


def map_key(
    key: str, renames: tuple[tuple[str, str], ...], drops: tuple[tuple[str, str], ...]
) -> tuple[str | None, str | None]:
    """`(our key, None)`, `(None, why it is dropped)` or `(None, None)` when no rule applies."""
    for pattern, reason in drops:
        if re.fullmatch(pattern, key):
            return None, reason
    for pattern, template in renames:
        if match := re.fullmatch(pattern, key):
            return match.expand(template), None
    return None, None


def is_text_side(key: str) -> bool:
    """Whether our `key` is a Q-Former text-side tensor (word/position embeddings, a layer's text FFN)."""
    return TEXT_SIDE.fullmatch(key) is not None


def group_of(key: str) -> str:
    """The weight group of our `key` (the first of `GROUPS` that matches)."""
    return next((name for name, pattern in GROUPS if pattern.fullmatch(key)), "other")


def layer_indices(keys, prefix: str) -> list[int]:
    """Sorted layer numbers N of keys `<prefix>.N.<...>` (prefix regex-escaped by the caller's string)."""
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)\..+")
    return sorted({int(m.group(1)) for key in keys if (m := pattern.fullmatch(key))})
