"""Candidate ranking == scoring each (prompt, candidate) pair on its own through `model.forward`, both LLM kinds
(Llama and OPT decoder-only, T5 encoder-decoder)."""

from __future__ import annotations

import pytest
import tiny
import torch

from hf_instructblip import InstructBlipConfig, InstructBlipForConditionalGeneration
from hf_instructblip.evaluate.ranking import rank_candidates

IMAGE_TOKEN = 319
PROMPTS = ["what is in the picture ?", "how many shapes are there ? answer :"]
# Per example, candidates of different token lengths (and a different number of them).
CANDIDATES = [["a red circle", "two", "a blue square and a green triangle"], ["two shapes", "three", "a cat", "red"]]


def build_model(kind: str) -> InstructBlipForConditionalGeneration:
    config = InstructBlipConfig(**tiny.config_kwargs(kind, image_token_index=IMAGE_TOKEN))
    return tiny.randomize_(InstructBlipForConditionalGeneration(config)).eval()


def prompt_ids(kind: str, tokenizer, prompt: str) -> list[int]:
    """[image placeholders][prompt tokens]: BOS after the placeholders for decoder-only, EOS-terminated for T5."""
    return [IMAGE_TOKEN] * tiny.NUM_QUERY_TOKENS + tokenizer(prompt)["input_ids"]


def pad(rows: list[list[int]], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        span = slice(length - len(row), length) if side == "left" else slice(0, len(row))
        ids[i, span], mask[i, span] = torch.tensor(row), 1
    return ids, mask


@pytest.fixture(scope="module", params=["llama", "opt", "t5"])
def setup(request):
    kind = request.param
    tokenizer = tiny.llm_tokenizer(kind)
    qtok = tiny.qformer_tokenizer()
    prompts = [prompt_ids(kind, tokenizer, p) for p in PROMPTS]
    # Decoder-only batches are left padded, encoder-decoder ones right padded (each kind's convention).
    input_ids, attention_mask = pad(prompts, "right" if kind == "t5" else "left")
    q = qtok(PROMPTS, padding=True, return_tensors="pt")
    inputs = dict(pixel_values=tiny.pixel_values(2), qformer_input_ids=q.input_ids,
                  qformer_attention_mask=q.attention_mask, input_ids=input_ids, attention_mask=attention_mask)
    cand_ids = [[tokenizer(c, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for c in ex]
                for ex in CANDIDATES]
    model = build_model(kind)
    expected = reference_scores(model, kind, inputs, prompts, cand_ids)
    return kind, model, tokenizer, inputs, expected, cand_ids


def reference_scores(model, kind, inputs, prompts, cand_ids) -> list[list[tuple[float, int]]]:
    """(summed log-likelihood, token count) per pair, each pair through `model.forward` alone, unpadded."""
    out = []
    for i, (prompt, options) in enumerate(zip(prompts, cand_ids)):
        image = dict(pixel_values=inputs["pixel_values"][i : i + 1],
                     qformer_input_ids=inputs["qformer_input_ids"][i : i + 1],
                     qformer_attention_mask=inputs["qformer_attention_mask"][i : i + 1])
        row = []
        for cand in options:
            if kind != "t5":  # one sequence [prompt][candidate]; loss only on the candidate
                ids = torch.tensor([prompt + cand])
                labels = torch.tensor([[-100] * len(prompt) + cand])
            else:  # encoder reads the prompt, decoder target is the candidate
                ids, labels = torch.tensor([prompt]), torch.tensor([cand])
            with torch.no_grad():
                loss = model(**image, input_ids=ids, labels=labels).loss  # mean over candidate tokens
            row.append((-loss.item() * len(cand), len(cand)))
        out.append(row)
    return out


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_ranking_matches_pairwise_forward(setup, reduction):
    _, model, _, inputs, expected, cand_ids = setup
    result = rank_candidates(model, **inputs, candidates=cand_ids, reduction=reduction)
    for scores, ref in zip(result.scores, expected):
        want = torch.tensor([s if reduction == "sum" else s / n for s, n in ref])
        torch.testing.assert_close(scores, want, atol=1e-5, rtol=1e-6)  # sums of ~100 nats: float32 ulp is ~1e-5
    for order, ref in zip(result.ranking, expected):
        values = [s if reduction == "sum" else s / n for s, n in ref]
        assert order == sorted(range(len(values)), key=lambda j: -values[j])
    assert result.best == [order[0] for order in result.ranking]


def test_string_candidates_and_chunking_agree_with_token_ids(setup):
    kind, model, tokenizer, inputs, _, cand_ids = setup
    by_ids = rank_candidates(model, **inputs, candidates=cand_ids)
    by_text = rank_candidates(model, **inputs, candidates=CANDIDATES, tokenizer=tokenizer, candidate_batch_size=2)
    for a, b in zip(by_ids.scores, by_text.scores):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert by_ids.ranking == by_text.ranking


def test_image_path_and_prompt_run_once(setup):
    """The vision encoder runs once per call; the prompt once per example (decoder-only) / once (encoder)."""
    kind, model, _, inputs, _, cand_ids = setup
    calls = {"vision": 0, "prompt": 0}

    def count(name):
        def hook(*_):
            calls[name] += 1
        return hook

    prompt_module = model.language_model.get_encoder() if kind == "t5" else model.language_model
    handles = [model.vision_model.register_forward_hook(count("vision")),
               prompt_module.register_forward_hook(count("prompt"))]
    try:
        rank_candidates(model, **inputs, candidates=cand_ids)
    finally:
        for handle in handles:
            handle.remove()
    assert calls["vision"] == 1
    # decoder-only: per example one prompt pass + one pass for all its candidates; t5: one encoder pass in all.
    assert calls["prompt"] == (1 if kind == "t5" else 2 * len(cand_ids))


def test_bad_arguments_are_named(setup):
    _, model, _, inputs, _, cand_ids = setup
    with pytest.raises(ValueError, match="reduction"):
        rank_candidates(model, **inputs, candidates=cand_ids, reduction="max")
    with pytest.raises(ValueError, match="one list per image"):
        rank_candidates(model, **inputs, candidates=cand_ids[:1])
    with pytest.raises(ValueError, match=r"candidates\[1\]\[0\]"):
        rank_candidates(model, **inputs, candidates=[cand_ids[0], [[]]])
    with pytest.raises(TypeError, match="tokenizer"):
        rank_candidates(model, **inputs, candidates=CANDIDATES)
    with pytest.raises(ValueError, match="candidate_batch_size"):
        rank_candidates(model, **inputs, candidates=cand_ids, candidate_batch_size=0)
    with pytest.raises(ValueError, match="input_ids"):
        rank_candidates(model, inputs["pixel_values"], inputs["qformer_input_ids"], candidates=cand_ids)


def test_t5_scores_ignore_pads_between_image_and_prompt():
    """The processor left-pads after the placeholders (`[image][pad][prompt]`); T5 ranking must score as unpadded."""
    kind = "t5"
    tokenizer = tiny.llm_tokenizer(kind)
    qtok = tiny.qformer_tokenizer()
    model = build_model(kind)
    prompts = [prompt_ids(kind, tokenizer, p) for p in PROMPTS]
    width = max(len(p) for p in prompts)
    Q = tiny.NUM_QUERY_TOKENS
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        pads = width - len(p)
        ids[i] = torch.tensor(p[:Q] + [0] * pads + p[Q:])
        mask[i] = torch.tensor([1] * Q + [0] * pads + [1] * (len(p) - Q))
    assert (mask[:, Q] == 0).any()  # one row really has pads in the middle
    q = qtok(PROMPTS, padding=True, return_tensors="pt")
    cand_ids = [[tokenizer(c, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for c in ex]
                for ex in CANDIDATES]
    inputs = dict(pixel_values=tiny.pixel_values(2), qformer_input_ids=q.input_ids,
                  qformer_attention_mask=q.attention_mask, input_ids=ids, attention_mask=mask)
    expected = reference_scores(model, kind, inputs, prompts, cand_ids)
    result = rank_candidates(model, **inputs, candidates=cand_ids)
    for scores, ref in zip(result.scores, expected):
        torch.testing.assert_close(scores, torch.tensor([s for s, _ in ref]), atol=1e-5, rtol=1e-6)
