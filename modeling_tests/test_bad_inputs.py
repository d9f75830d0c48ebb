"""Bad input, one table: each case gives a clear error (type + a message naming the offending input) before work is
spent, or, for inputs that used to give a silently wrong result, the right value.

Converter and evaluation-runner cases live beside their tools (test_conversion.py, test_evaluate.py); image
decoding cases in test_images.py; collator truncation and empty answers in test_collator.py.
"""

from __future__ import annotations

import pytest
import tiny
import torch
from test_modeling import IMAGE_TOKEN, Q, batch_inputs, labels_for, make_ours

from hf_instructblip import InstructBlipConfig, sync_image_token


def config(**overrides) -> InstructBlipConfig:
    return InstructBlipConfig(**tiny.config_kwargs("llama", IMAGE_TOKEN, **overrides))


CONFIG_CASES = [
    (dict(num_query_tokens=0), ValueError, r"`num_query_tokens` must be an int >= 1, found 0"),
    (dict(num_query_tokens=-3), ValueError, r"`num_query_tokens` must be an int >= 1, found -3"),
    (dict(num_query_tokens="32"), TypeError, r"`num_query_tokens` must be an int >= 1, found str '32'"),
    (dict(qformer_config=tiny.qformer_config(cross_attention_frequency=0)), ValueError,
     r"`cross_attention_frequency` must be an int >= 1, found 0"),
    (dict(vision_config=tiny.vision_config(image_size=30)), ValueError,
     r"image_size \(30\) must be a multiple of patch_size \(14\)"),
    (dict(vision_config=tiny.vision_config(num_attention_heads=5)), ValueError,
     r"vision_config: hidden_size \(32\) must be divisible by num_attention_heads \(5\)"),
]


@pytest.mark.parametrize(("overrides", "error", "pattern"), CONFIG_CASES,
                         ids=["no-queries", "negative-queries", "str-queries", "cross-attention-0", "border-pixels",
                              "heads"])
def test_bad_configs(overrides, error, pattern):
    with pytest.raises(error, match=pattern):
        config(**overrides)


@pytest.fixture(scope="module")
def model():
    return make_ours("llama", seed=40)


def inputs_with(**changes) -> dict:
    inputs = batch_inputs(seed=41)
    inputs.update(labels_for("llama", inputs))
    for key, change in changes.items():
        inputs[key] = change(inputs[key]) if callable(change) else change
    return inputs


MODEL_CASES = [
    ("uint8-pixels", dict(pixel_values=lambda p: (p * 50).clamp(0, 255).to(torch.uint8)), TypeError,
     r"`pixel_values` must be normalised floats, found dtype torch.uint8 .*processor"),
    ("bool-pixels", dict(pixel_values=lambda p: p > 0), TypeError, r"`pixel_values` must be normalised floats"),
    ("nan-pixels", dict(pixel_values=lambda p: p.index_fill(0, torch.tensor([1]), float("nan"))), ValueError,
     r"`pixel_values` holds NaN or infinite values"),
    ("inf-pixels", dict(pixel_values=lambda p: p.index_fill(0, torch.tensor([0]), float("inf"))), ValueError,
     r"`pixel_values` holds NaN or infinite values"),
    ("mask-shorter-than-ids", dict(attention_mask=lambda m: m[:, 1:]), ValueError,
     r"`attention_mask` must have the shape of `input_ids` \[3, 11\], found \[3, 10\]"),
    ("mask-other-batch", dict(attention_mask=lambda m: m[:2]), ValueError,
     r"disagree on the batch size \(found \{'input_ids': 3, 'pixel_values': 3, 'attention_mask': 2"),
    ("qformer-mask-shape", dict(qformer_attention_mask=lambda m: m[:, :4]), ValueError,
     r"`qformer_attention_mask` must have the shape of `qformer_input_ids` \[3, 6\], found \[3, 4\]"),
    ("pixels-other-batch", dict(pixel_values=lambda p: p[:2]), ValueError,
     r"disagree on the batch size \(found \{'input_ids': 3, 'pixel_values': 2"),
    ("labels-shape", dict(labels=lambda l: l[:, 2:]), ValueError,
     r"`labels` must have the shape of `input_ids` \[3, 11\] .*found \[3, 9\]"),
    ("labels-beyond-vocab", dict(labels=lambda l: l.masked_fill(l == -100, 320)), ValueError,
     r"`labels` must be -100 \(ignored\) or ids below the LLM vocabulary size 320, found \[320\]"),
    ("labels-negative", dict(labels=lambda l: l.masked_fill(l == -100, -5)), ValueError,
     r"`labels` must be -100 .*found \[-5\]"),
    ("labels-float", dict(labels=lambda l: l.float()), ValueError, r"`labels` must be an integer tensor"),
    ("qformer-text-too-long", dict(qformer_input_ids=torch.ones(3, 200, dtype=torch.long),
                                   qformer_attention_mask=torch.ones(3, 200, dtype=torch.long)), ValueError,
     r"`qformer_input_ids` holds 200 positions, more than the 128 of the Q-Former "
     r"\(qformer_config.max_position_embeddings\); .*qformer_max_length"),
    ("both-texts-too-long", dict(qformer_input_ids=torch.ones(3, 284, dtype=torch.long), qformer_attention_mask=None,
                                 input_ids=lambda i: torch.cat([i, torch.full((3, 300), 7)], 1),
                                 attention_mask=None, labels=None), ValueError,
     r"`qformer_input_ids` holds 284 positions, more than the 128 of the Q-Former"),
    ("one-image-without-batch", dict(pixel_values=lambda p: p[0]), ValueError,
     r"`pixel_values` must be \[batch, channels, height, width\] .*found rank 3 \[3, 28, 28\]"),
    ("prompt-too-long", dict(input_ids=lambda i: torch.cat([i, torch.full((3, 300), 7)], 1),
                             attention_mask=None, labels=None), ValueError,
     r"`input_ids` holds 311 positions, more than the 256 of the LLM \(text_config.max_position_embeddings\); "
     r".*truncation=True, max_length"),
]


@pytest.mark.parametrize(("changes", "error", "pattern"), [case[1:] for case in MODEL_CASES],
                         ids=[case[0] for case in MODEL_CASES])
def test_bad_model_inputs(model, changes, error, pattern):
    with pytest.raises(error, match=pattern):
        model(**inputs_with(**changes))


def test_one_image_without_batch_dimension_against_a_batch_of_one(model):
    """A [3, H, W] image next to one prompt: its channel count must not be read as a batch size of 3."""
    inputs = {key: value[:1] for key, value in inputs_with().items()}
    inputs["pixel_values"] = inputs["pixel_values"][0]
    with pytest.raises(ValueError, match=r"`pixel_values` must be \[batch, channels, height, width\].*found rank 3"):
        model(**inputs)


def test_q_former_text_too_long_for_get_image_features(model):
    inputs = inputs_with()
    long_text = torch.ones(3, 284, dtype=torch.long)
    with pytest.raises(ValueError, match=r"`qformer_input_ids` holds 284 positions, more than the 128 of the Q-Former"):
        model.get_image_features(inputs["pixel_values"], qformer_input_ids=long_text)


def test_image_token_outside_the_vocabulary_points_to_sync_image_token():
    model = make_ours("llama", seed=42)
    model.config.image_token_index = 400  # e.g. a token the tokenizer added after the embeddings were sized
    inputs = inputs_with(input_ids=lambda i: i.masked_fill(i == IMAGE_TOKEN, 400), labels=None)
    with pytest.raises(ValueError, match=r"image_token_index \(400\) is not a row .*sync_image_token"):
        model(**inputs)


def test_image_smaller_than_a_patch_with_interpolation(model):
    with pytest.raises(ValueError, match=r"`pixel_values` must be at least one patch \(14x14\) in size, found 10x10"):
        model(**inputs_with(pixel_values=torch.zeros(3, 3, 10, 10)), interpolate_pos_encoding=True)


def test_processor_q_former_bound_beyond_the_q_former_positions_is_refused_at_sync():
    processor = tiny.processor("llama", qformer_max_length=200)
    model = make_ours("llama", seed=43)
    with pytest.raises(ValueError, match=r"`qformer_max_length` \(200\) .* 128 positions"):
        sync_image_token(model, processor)


def test_the_checks_stay_out_of_a_compiled_graph(model):
    """Value checks sync the host: under tracing they are skipped, so dynamo sees one graph (no break)."""
    explanation = torch._dynamo.explain(model)(**inputs_with())
    assert explanation.graph_break_count == 0, explanation.break_reasons
