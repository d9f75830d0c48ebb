"""Candidate ranking: score each example's candidate answers by the LLM's log-likelihood given image + prompt
(multiple-choice and classification sets). The image path (vision encoder + Q-Former) runs once per batch and
the shared prompt once per example: decoder-only LLMs score every candidate on top of its KV cache;
encoder-decoder LLMs run the encoder once and score all (example, candidate) pairs through the decoder.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from transformers.modeling_outputs import BaseModelOutput

from ..model.layout import pad_right
from ..model.validation import check_choice, check_int

REDUCTIONS = ("sum", "mean")


@dataclass
class CandidateRanking:
    """Result of `rank_candidates`, one entry per example.

    `scores[i]`: float32 `[C_i]` log-likelihood of each candidate (summed or averaged over its tokens; higher is
    better). `ranking[i]`: candidate indices, best first (ties keep input order). `best`: `ranking[i][0]`.
    `greedy[i]`: bool `[C_i]`, whether every token of the candidate is the LLM's most likely one given the image,
    the prompt and the candidate's tokens before it (lmms-eval's `is_greedy`).
    """

    scores: list[torch.Tensor]
    ranking: list[list[int]]
    greedy: list[torch.Tensor]

    @property
    def best(self) -> list[int]:
        return [order[0] for order in self.ranking]


@torch.no_grad()
def rank_candidates(
    model, pixel_values: torch.Tensor, qformer_input_ids: torch.Tensor | None = None,
    qformer_attention_mask: torch.Tensor | None = None, input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None, *, candidates: Sequence[Sequence[Sequence[int] | torch.Tensor | str]],
    reduction: str = "sum", tokenizer=None, add_eos: bool = True, candidate_batch_size: int | None = None,
    interpolate_pos_encoding: bool = False,
) -> CandidateRanking:
    """Rank `candidates[i]` for example i by log p(candidate | image_i, prompt_i) under `model`'s LLM (in eval mode).

    The tensors are the processor's output for the prompts, as for `generate`; prompts may be left or right padded.
    `candidates[i]` lists example i's candidates (their number may differ between examples): token ids (a list
    or a 1-D tensor), scored exactly as given, or strings, which `tokenizer` tokenizes as written, without special
    tokens, plus EOS with `add_eos` (the training targets end with it, so "a dog" is not a free prefix of "a dog
    on grass"). `reduction`: "sum" (total log-likelihood) or "mean" (per token: no bias to short answers).
    `candidate_batch_size`: at most this many candidates per LLM call (None: an example's candidates at once for
    decoder-only LLMs, all pairs of the batch at once for encoder-decoder LLMs).

    Example:
        >>> inputs = processor(images=[image], text=["Is this a cat or a dog?"], return_tensors="pt")
        >>> result = rank_candidates(model, **inputs, candidates=[["cat", "dog"]], tokenizer=processor.tokenizer)
        >>> result.best  # [1] if "dog" is the likelier answer
    """
    check_choice("reduction", reduction, REDUCTIONS)
    check_int("candidate_batch_size", candidate_batch_size, allow_none=True)
    if input_ids is None:
        raise ValueError("`input_ids` is required: the prompt, holding the image placeholders, that candidates follow.")
    batch = pixel_values.shape[0]
    candidate_ids = _candidate_ids(candidates, batch, tokenizer, add_eos)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"`attention_mask` must have the shape of `input_ids` {list(input_ids.shape)}, "
                         f"found {list(attention_mask.shape)}.")

    features = model.get_image_features(
        pixel_values, qformer_input_ids, qformer_attention_mask, interpolate_pos_encoding
    ).pooler_output  # [B, Q, D_llm]
    # [B, L, D_llm]: placeholders checked and filled; an encoder-decoder LLM gets its padding moved to the row ends
    embeds, attention_mask = model.prepare_llm_inputs(input_ids, features, attention_mask)
    if model.config.use_decoder_only_language_model:
        log_likelihoods = _decoder_only_log_likelihoods
    else:
        log_likelihoods = _encoder_decoder_log_likelihoods
    scored = log_likelihoods(model.language_model, embeds, attention_mask, candidate_ids, candidate_batch_size)
    scores, greedy = [s for s, _ in scored], [g for _, g in scored]
    if reduction == "mean":
        lengths = [torch.tensor([len(ids) for ids in options], dtype=torch.float32) for options in candidate_ids]
        scores = [s / n for s, n in zip(scores, lengths)]
    ranking = [torch.sort(s, descending=True, stable=True).indices.tolist() for s in scores]
    return CandidateRanking(scores=scores, ranking=ranking, greedy=greedy)


# --- candidates -----------------------------------------------------------------------------------------------
def _candidate_ids(candidates, batch: int, tokenizer, add_eos: bool) -> list[list[list[int]]]:
    """Validate `candidates` and turn every candidate into a non-empty list of token ids."""
    if isinstance(candidates, (str, torch.Tensor)) or not isinstance(candidates, Sequence):
        raise TypeError(f"`candidates` must be a list (one list of candidates per example), "
                        f"found {type(candidates).__name__}.")
    if len(candidates) != batch:
        raise ValueError(f"`candidates` must hold one list per image: {batch} images, found {len(candidates)} lists.")
    result = []
    for i, options in enumerate(candidates):
        if isinstance(options, (str, torch.Tensor)) or not isinstance(options, Sequence) or len(options) == 0:
            raise ValueError(f"`candidates[{i}]` must be a non-empty list of candidates, found {options!r}.")
        result.append([_one_candidate(option, f"candidates[{i}][{j}]", tokenizer, add_eos)
                       for j, option in enumerate(options)])
    return result


def _one_candidate(option, name: str, tokenizer, add_eos: bool) -> list[int]:
    if isinstance(option, str):
        if tokenizer is None:
            raise TypeError(f"`{name}` is a string ({option!r}): pass `tokenizer=` to tokenize it, or give token ids.")
        ids = list(tokenizer(option, add_special_tokens=False)["input_ids"])
        if add_eos:
            if tokenizer.eos_token_id is None:
                raise ValueError("`add_eos=True` but the tokenizer has no eos_token_id; pass add_eos=False.")
            if not ids or ids[-1] != tokenizer.eos_token_id:
                ids.append(tokenizer.eos_token_id)
    elif isinstance(option, torch.Tensor) and option.dim() == 1:
        ids = option.tolist()
    elif isinstance(option, Sequence) and all(isinstance(t, int) and not isinstance(t, bool) for t in option):
        ids = list(option)
    else:
        raise TypeError(f"`{name}` must be a string, a list of token ids or a 1-D tensor, found {option!r}.")
    if len(ids) == 0:
        raise ValueError(f"`{name}` has no tokens: an empty answer cannot be scored.")
    return ids


def _chunks(items: list, size: int | None) -> Iterator[list]:
    size = size or len(items)
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _token_log_likelihood(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """`logits` `[N, T, V]` predict `targets` `[N, T]` (`mask` 1 on real tokens): the summed log p(target) `[N]`
    float32 and whether every real target is the argmax `[N]` bool, both on the CPU."""
    log_probs = logits.float().log_softmax(dim=-1)  # [N, T, V]
    target_log_probs = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [N, T]
    greedy = ((log_probs.argmax(dim=-1) == targets) | (mask == 0)).all(dim=1)  # [N]
    return (target_log_probs * mask).sum(dim=1).cpu(), greedy.cpu()


# --- the two LLM kinds -------------------------------------------------------------------------------------------
def _cache_argument(llm) -> str:
    """The LLM's name for the KV cache input: `cache` from transformers 5.24, `past_key_values` before it."""
    return "cache" if "cache" in inspect.signature(llm.forward).parameters else "past_key_values"


def _output_cache(outputs, llm):
    """The KV cache an LLM returned (`cache` or, before transformers 5.24, `past_key_values`)."""
    cache = outputs["cache"] if "cache" in outputs else outputs.get("past_key_values")
    if not hasattr(cache, "batch_repeat_interleave"):
        raise TypeError(f"{type(llm).__name__} returned no transformers `Cache`, which candidate ranking reuses.")
    return cache


def _decoder_only_log_likelihoods(
    llm, embeds: torch.Tensor, attention_mask: torch.Tensor, candidates: list[list[list[int]]], chunk: int | None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per example: run the unpadded prompt once, then all candidates on copies of its KV cache. Returns per example
    (summed log-likelihoods `[C]`, greedy flags `[C]`)."""
    sums = []
    for i, options in enumerate(candidates):
        # Dropping the padding keeps positions 0..P-1, so scores do not depend on how the batch was padded.
        prompt = embeds[i, attention_mask[i].bool()].unsqueeze(0)  # [1, P, D]
        prompt_mask = torch.ones(prompt.shape[:2], dtype=torch.long, device=prompt.device)
        prefix = llm(inputs_embeds=prompt, attention_mask=prompt_mask, use_cache=True, return_dict=True)
        prompt_cache = _output_cache(prefix, llm)
        first_logits = prefix.logits[:, -1:]  # [1, 1, V]: predicts every candidate's first token
        example_sums = []
        parts = list(_chunks(options, chunk))
        for k, part in enumerate(parts):
            ids, mask = pad_right(part, 0, prompt.device)  # [C, T]
            # The forward appends to the cache in place: the last chunk may consume the prompt's own cache.
            cache = prompt_cache if k == len(parts) - 1 else copy.deepcopy(prompt_cache)
            cache.batch_repeat_interleave(len(part))  # [1, ...] -> [C, ...] per layer
            out = llm(input_ids=ids, attention_mask=torch.cat([prompt_mask.expand(len(part), -1), mask], dim=1),
                      use_cache=True, return_dict=True, **{_cache_argument(llm): cache})
            # Position t of the candidate pass predicts token t + 1; token 0 comes from the prompt's last position.
            logits = torch.cat([first_logits.expand(len(part), -1, -1), out.logits[:, :-1]], dim=1)  # [C, T, V]
            example_sums.append(_token_log_likelihood(logits, ids, mask))
        sums.append(tuple(torch.cat(parts) for parts in zip(*example_sums)))
    return sums


def _encoder_decoder_log_likelihoods(
    llm, embeds: torch.Tensor, attention_mask: torch.Tensor, candidates: list[list[list[int]]], chunk: int | None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Run the encoder once for the batch, then score (example, candidate) pairs in batched decoder calls. Returns per
    example (summed log-likelihoods `[C]`, greedy flags `[C]`)."""
    encoder_states = llm.get_encoder()(
        inputs_embeds=embeds, attention_mask=attention_mask, return_dict=True
    ).last_hidden_state  # [B, L, D]
    pairs = [(i, ids) for i, options in enumerate(candidates) for ids in options]
    flat = []
    for part in _chunks(pairs, chunk):
        rows = torch.tensor([i for i, _ in part], device=embeds.device)
        targets, mask = pad_right([ids for _, ids in part], 0, embeds.device)  # [N, T]
        decoder_input_ids = llm.prepare_decoder_input_ids_from_labels(labels=targets.masked_fill(mask == 0, -100))
        out = llm(encoder_outputs=BaseModelOutput(last_hidden_state=encoder_states[rows]),
                  attention_mask=attention_mask[rows], decoder_input_ids=decoder_input_ids, use_cache=False,
                  return_dict=True)
        flat.append(_token_log_likelihood(out.logits, targets, mask))  # [N], [N]
    sizes = [len(options) for options in candidates]
    sums, greedy = (torch.cat(parts).split(sizes) for parts in zip(*flat))
    return list(zip(sums, greedy))
