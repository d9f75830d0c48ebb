"""Core model: parity with transformers' InstructBLIP (the oracle), round trips, Auto classes, validation."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
import tiny
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText
from transformers import InstructBlipConfig as RefConfig
from transformers import InstructBlipForConditionalGeneration as RefModel

from hf_instructblip import InstructBlipConfig, InstructBlipForConditionalGeneration

Q = tiny.NUM_QUERY_TOKENS
IMAGE_TOKEN = 319


def make_reference(kind: str, seed: int = 0) -> RefModel:
    return tiny.randomize_(RefModel(RefConfig(**tiny.config_kwargs(kind, IMAGE_TOKEN))), seed).eval()


def make_ours(kind: str, seed: int = 0, **overrides) -> InstructBlipForConditionalGeneration:
    config = InstructBlipConfig(**tiny.config_kwargs(kind, IMAGE_TOKEN, **overrides))
    return tiny.randomize_(InstructBlipForConditionalGeneration(config), seed).eval()


def batch_inputs(batch: int = 3, seed: int = 0) -> dict:
    """Left-padded prompts of different lengths, each with Q placeholders, plus Q-Former text."""
    gen = torch.Generator().manual_seed(seed)
    lengths = [5, 3, 7][:batch]
    width = Q + max(lengths)
    input_ids = torch.zeros(batch, width, dtype=torch.long)
    attention_mask = torch.zeros(batch, width, dtype=torch.long)
    for row, length in enumerate(lengths):
        prompt = torch.randint(4, 300, (length,), generator=gen)
        ids = torch.cat([torch.full((Q,), IMAGE_TOKEN), prompt])
        input_ids[row, width - len(ids):] = ids
        attention_mask[row, width - len(ids):] = 1
    qformer_input_ids = torch.randint(1, 64, (batch, 6), generator=gen)
    qformer_attention_mask = torch.ones_like(qformer_input_ids)
    qformer_attention_mask[1, :2] = 0  # one left-padded instruction
    return dict(pixel_values=tiny.pixel_values(batch, seed), input_ids=input_ids, attention_mask=attention_mask,
                qformer_input_ids=qformer_input_ids, qformer_attention_mask=qformer_attention_mask)


def labels_for(kind: str, inputs: dict) -> dict:
    if kind == "t5":
        labels = torch.randint(4, 300, (inputs["input_ids"].shape[0], 4), generator=torch.Generator().manual_seed(1))
        labels[0, -1] = -100
        return {"labels": labels}
    labels = inputs["input_ids"].clone()
    labels[inputs["attention_mask"] == 0] = -100
    labels[labels == IMAGE_TOKEN] = -100
    return {"labels": labels}


@pytest.fixture(scope="module", params=tiny.LLM_KINDS)
def pair(request, tmp_path_factory):
    """transformers' model saved with `save_pretrained`, ours loaded from that folder."""
    kind = request.param
    folder = tmp_path_factory.mktemp(f"ref_{kind}")
    reference = make_reference(kind)
    reference.save_pretrained(folder)
    ours, info = InstructBlipForConditionalGeneration.from_pretrained(folder, output_loading_info=True)
    return kind, reference, ours.eval(), info


def test_loads_reference_checkpoint_without_missing_or_unexpected_keys(pair):
    _, reference, ours, info = pair
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert set(ours.state_dict()) == set(reference.state_dict())


def test_logits_and_loss_match_reference(pair):
    kind, reference, ours, _ = pair
    inputs = batch_inputs()
    inputs.update(labels_for(kind, inputs))
    with torch.no_grad():
        expected, actual = reference(**inputs), ours(**inputs)
    torch.testing.assert_close(actual.logits, expected.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(actual.loss, expected.loss, atol=1e-5, rtol=0)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_generate_matches_reference(pair, num_beams):
    _, reference, ours, _ = pair
    inputs = batch_inputs()
    settings = dict(max_new_tokens=6, min_new_tokens=6, num_beams=num_beams, do_sample=False)
    expected = reference.generate(**inputs, **settings)
    actual = ours.generate(**inputs, **settings)
    assert torch.equal(actual, expected)


def test_reference_loads_our_checkpoint(pair, tmp_path):
    kind, _, ours, _ = pair
    ours.save_pretrained(tmp_path)
    reference, info = RefModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    inputs = batch_inputs(seed=3)
    inputs.update(labels_for(kind, inputs))
    with torch.no_grad():
        torch.testing.assert_close(reference.eval()(**inputs).logits, ours(**inputs).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("shard", [None, "20KB"])
def test_save_load_round_trip_is_bit_exact(tmp_path, shard):
    model = make_ours("llama", seed=4)
    model.save_pretrained(tmp_path, **({"max_shard_size": shard} if shard else {}))
    if shard:
        assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    loaded = InstructBlipForConditionalGeneration.from_pretrained(tmp_path)
    expected, actual = model.state_dict(), loaded.state_dict()
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key


def test_auto_classes_return_ours(tmp_path):
    make_ours("t5").save_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), InstructBlipConfig)
    assert type(AutoModel.from_pretrained(tmp_path)) is InstructBlipForConditionalGeneration
    assert type(AutoModelForImageTextToText.from_pretrained(tmp_path)) is InstructBlipForConditionalGeneration
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert set(auto_map) >= {"AutoConfig", "AutoModel", "AutoModelForImageTextToText"}


def test_the_pretrained_base_class_is_exported_and_shared():
    import hf_instructblip

    base = hf_instructblip.InstructBlipPreTrainedModel
    assert "InstructBlipPreTrainedModel" in hf_instructblip.__all__
    for cls in (InstructBlipForConditionalGeneration, hf_instructblip.InstructBlipVisionModel,
                hf_instructblip.InstructBlipQFormerModel, hf_instructblip.InstructBlipVideoForConditionalGeneration):
        assert issubclass(cls, base), cls


def test_fused_head_loss_is_a_call_option_not_a_checkpoint_setting(tmp_path):
    """Folders saved by 0.1 carry `fused_head_loss` in config.json: they load, and saving drops the key."""
    model = make_ours("llama", seed=6)
    model.save_pretrained(tmp_path)
    config_file = tmp_path / "config.json"
    assert "fused_head_loss" not in json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "fused_head_loss": True}))
    loaded = InstructBlipForConditionalGeneration.from_pretrained(tmp_path)
    assert not hasattr(loaded.config, "fused_head_loss")
    loaded.save_pretrained(tmp_path / "again")
    assert "fused_head_loss" not in json.loads((tmp_path / "again" / "config.json").read_text())


def test_model_folder_imports_nothing_outside_itself():
    """What ships as remote code must load without the package: only relative imports of its own modules."""
    import ast
    from pathlib import Path

    import hf_instructblip.model

    folder = Path(hf_instructblip.model.__file__).parent
    own = {path.stem for path in folder.glob("*.py")}
    for path in folder.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert node.level == 1 and node.module in own, (path.name, node.module)
            names = [a.name for a in node.names] if isinstance(node, (ast.Import, ast.ImportFrom)) else []
            module = getattr(node, "module", None) or ""
            assert not any(n.startswith("hf_instructblip") for n in [*names, module]), (path.name, module, names)


def test_image_embeds_replace_pixel_values(model):
    """Precomputed vision features (e.g. from a cache) give the same outputs as the pixels they came from."""
    inputs = batch_inputs(seed=7)
    with torch.no_grad():
        expected = model(**inputs).logits
        embeds = model.vision_model(inputs["pixel_values"]).last_hidden_state
        actual = model(**{**inputs, "pixel_values": None}, image_embeds=embeds).logits
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"`image_embeds` must be the vision encoder's features \[batch, tokens, 32\]"):
        model(**inputs, image_embeds=embeds[..., :5])
    with pytest.raises(ValueError, match="`pixel_values` is required"):
        model(**{**inputs, "pixel_values": None})


def test_reads_official_config_without_loss(tmp_path):
    RefConfig(**tiny.config_kwargs("t5", IMAGE_TOKEN)).save_pretrained(tmp_path)
    official = json.loads((tmp_path / "config.json").read_text())
    assert official["model_type"] == "instructblip"
    config = InstructBlipConfig.from_pretrained(tmp_path)
    assert config.instruction_aware is True
    assert config.num_query_tokens == official["num_query_tokens"]
    assert config.image_token_index == official["image_token_index"]
    for name in ("vision_config", "qformer_config"):
        ours = getattr(config, name).to_dict()
        for key, value in official[name].items():
            if key not in ("model_type", "transformers_version"):
                assert ours[key] == value, (name, key)
    assert config.text_config.to_dict() == AutoConfig.for_model(**official["text_config"]).to_dict()


def test_instruction_aware_false_ignores_qformer_text_and_differs():
    aware = make_ours("llama", seed=6)
    blind = InstructBlipForConditionalGeneration(
        InstructBlipConfig(**tiny.config_kwargs("llama", IMAGE_TOKEN, instruction_aware=False))
    ).eval()
    blind.load_state_dict(aware.state_dict())
    inputs = batch_inputs(seed=6)
    with torch.no_grad():
        logits_blind = blind(**inputs).logits
        other_text = {**inputs, "qformer_input_ids": torch.randint(1, 64, inputs["qformer_input_ids"].shape)}
        no_text = {k: v for k, v in inputs.items() if not k.startswith("qformer")}
        torch.testing.assert_close(blind(**other_text).logits, logits_blind, atol=0, rtol=0)
        torch.testing.assert_close(blind(**no_text).logits, logits_blind, atol=0, rtol=0)
        assert (aware(**inputs).logits - logits_blind).abs().max() > 1e-3
        assert not torch.equal(aware(**other_text).logits, aware(**inputs).logits)  # the instruction matters
    assert blind.generate(**no_text, max_new_tokens=3).shape[0] == 3


def test_interpolate_pos_encoding_matches_reference():
    reference, ours = make_reference("opt"), make_ours("opt")
    ours.load_state_dict(reference.state_dict())
    inputs = batch_inputs(seed=7)
    inputs["pixel_values"] = torch.randn(3, 3, 42, 42)
    with torch.no_grad():
        expected = reference(**inputs, interpolate_pos_encoding=True).logits
        torch.testing.assert_close(ours(**inputs, interpolate_pos_encoding=True).logits, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("implementation", ["sdpa", "flex_attention"])
def test_attention_kernels_match_eager(tmp_path, implementation):
    make_ours("llama", seed=8).save_pretrained(tmp_path)
    eager = InstructBlipForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="eager").eval()
    other = InstructBlipForConditionalGeneration.from_pretrained(tmp_path, attn_implementation=implementation).eval()
    assert other.qformer.config._attn_implementation == implementation
    assert other.vision_model.config._attn_implementation == implementation
    inputs = batch_inputs(seed=8)
    real = inputs["attention_mask"].bool()  # padded positions hold kernel-dependent garbage
    with torch.no_grad():
        torch.testing.assert_close(other(**inputs).logits[real], eager(**inputs).logits[real], atol=5e-5, rtol=1e-5)


def test_gradient_checkpointing_gives_same_gradients():
    inputs = batch_inputs(seed=9)
    inputs.update(labels_for("llama", inputs))
    grads = []
    for checkpointing in (False, True):
        model = make_ours("llama", seed=9).train()
        if checkpointing:
            model.gradient_checkpointing_enable()
            assert model.qformer.encoder.layer[0].gradient_checkpointing
        model(**inputs).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_loading(tmp_path, dtype):
    make_ours("llama", seed=10).save_pretrained(tmp_path)
    model = InstructBlipForConditionalGeneration.from_pretrained(tmp_path, dtype=dtype).eval()
    # fp16 loading keeps the trained parts in fp32 (as BLIP-2 and LAVIS; transformers' InstructBLIP keeps only the
    # queries): `_keep_in_fp32_modules`, which also keeps them out of quantization. bf16 loading keeps none.
    kept = ("query_tokens", "qformer.", "language_projection.") if dtype == torch.float16 else ()
    assert {n: p.dtype for n, p in model.named_parameters()} == {
        n: torch.float32 if n.startswith(kept) else dtype for n, _ in model.named_parameters()}
    with torch.no_grad():
        logits = model(**batch_inputs(seed=10)).logits
        full = InstructBlipForConditionalGeneration.from_pretrained(tmp_path).eval()(**batch_inputs(seed=10)).logits
    assert logits.dtype == dtype and torch.isfinite(logits).all()
    # half-precision rounding moves these logits (|x| < ~4) by < 0.1 (bf16) / 0.02 (fp16); a wrong forward by ~1
    torch.testing.assert_close(logits.float(), full, atol={torch.bfloat16: 0.25, torch.float16: 0.05}[dtype], rtol=0)


def test_default_prompt_and_generation_config_are_honoured():
    model = make_ours("llama", seed=11)
    pixels = tiny.pixel_values(2, seed=11)
    qformer_ids = torch.randint(1, 64, (2, 4))
    model.generation_config.max_new_tokens = 2
    model.generation_config.min_new_tokens = 2
    out = model.generate(pixel_values=pixels, qformer_input_ids=qformer_ids)
    assert out.shape == (2, Q + 1 + 2)  # placeholders + BOS + two new tokens from the top-level config
    assert (out[:, :Q] == IMAGE_TOKEN).all() and (out[:, Q] == 1).all()


def test_get_image_features_shape():
    reference, model = make_reference("t5"), make_ours("t5")
    model.load_state_dict(reference.state_dict())
    pixels, qformer_ids = tiny.pixel_values(2), torch.randint(1, 64, (2, 5))
    with torch.no_grad():
        features = model.get_image_features(pixels, qformer_ids).pooler_output
        expected = reference.get_image_features(pixels, qformer_ids, torch.ones_like(qformer_ids)).pooler_output
    assert features.shape == (2, Q, model.config.text_config.hidden_size)
    torch.testing.assert_close(features, expected, atol=1e-5, rtol=0)


# --- validation: every error names the argument, what was expected and what was found ---------------------
@pytest.fixture(scope="module")
def model():
    return make_ours("llama", seed=12)


def test_error_wrong_number_of_placeholders(model):
    inputs = batch_inputs()
    inputs["input_ids"][1, -1] = IMAGE_TOKEN  # row 1 now has Q + 1
    inputs["input_ids"][2, -Q - 7] = 5  # row 2 (width 11: placeholders at 0..3) now has Q - 1
    with pytest.raises(ValueError, match=rf"num_query_tokens={Q}.*\{{1: {Q + 1}, 2: {Q - 1}\}}"):
        model(**inputs)
    without = {**batch_inputs(), "input_ids": torch.full((3, 5), 7), "attention_mask": None}
    with pytest.raises(ValueError, match=r"found \(row: count\) \{0: 0, 1: 0, 2: 0\}"):
        model.generate(**without, max_new_tokens=1)


def test_error_image_token_index_unset():
    model = InstructBlipForConditionalGeneration(
        InstructBlipConfig(**tiny.config_kwargs("llama", image_token_index=None))
    ).eval()
    with pytest.raises(ValueError, match="image_token_index is unset"):
        model(**batch_inputs())


def test_error_batch_mismatch(model):
    inputs = batch_inputs()
    inputs["pixel_values"] = tiny.pixel_values(2)
    inputs["qformer_input_ids"], inputs["qformer_attention_mask"] = (
        inputs["qformer_input_ids"][:2], inputs["qformer_attention_mask"][:2])
    with pytest.raises(ValueError, match=r"disagree on the batch size \(found \{'input_ids': 3, 'pixel_values': 2, "):
        model(**inputs)


def test_error_missing_qformer_input_ids(model):
    inputs = {k: v for k, v in batch_inputs().items() if not k.startswith("qformer")}
    with pytest.raises(ValueError, match="`qformer_input_ids` is required.*instruction-aware"):
        model(**inputs)


@pytest.mark.parametrize(
    "pixels, message",
    [
        (torch.zeros(3, 28, 28), r"\[batch, channels, height, width\] .*found rank 3 \[3, 28, 28\]"),
        (torch.zeros(3, 1, 28, 28), r"shape \[batch, 3, height, width\], found \[3, 1, 28, 28\]"),
        (torch.zeros(3, 3, 32, 28), r"must be 28x28.*found 32x28"),
    ],
)
def test_error_bad_pixel_values(model, pixels, message):
    with pytest.raises(ValueError, match=message):
        model(**{**batch_inputs(), "pixel_values": pixels})


def test_error_pixel_values_not_a_tensor(model):
    with pytest.raises(TypeError, match="`pixel_values` must be a torch.Tensor, found list"):
        model(**{**batch_inputs(), "pixel_values": [[0.0]]})


def test_t5_padding_between_image_and_prompt_is_harmless():
    """The processor writes `[image x Q][pad...][prompt]` for left-padded batches. T5's relative positions would count
    those pads; ours moves them to the end, so the result equals the reference's on `[image][prompt][pad...]`."""
    reference, ours = make_reference("t5"), make_ours("t5")
    ours.load_state_dict(reference.state_dict())
    inputs = batch_inputs(seed=14)
    inputs.update(labels_for("t5", inputs))
    mask = inputs["attention_mask"].bool()
    compact_ids = torch.zeros_like(inputs["input_ids"])
    compact_mask = torch.zeros_like(inputs["attention_mask"])
    processor_ids, processor_mask = compact_ids.clone(), compact_mask.clone()
    for row in range(3):
        real = inputs["input_ids"][row][mask[row]]  # [Q placeholders, prompt]
        pads = int((~mask[row]).sum())
        compact_ids[row, : len(real)], compact_mask[row, : len(real)] = real, 1
        processor_ids[row] = torch.cat([real[:Q], torch.zeros(pads, dtype=torch.long), real[Q:]])
        processor_mask[row] = torch.cat([torch.ones(Q), torch.zeros(pads), torch.ones(len(real) - Q)]).long()
    assert not torch.equal(processor_ids, compact_ids)
    with torch.no_grad():
        expected = reference(**{**inputs, "input_ids": compact_ids, "attention_mask": compact_mask})
        actual = ours(**{**inputs, "input_ids": processor_ids, "attention_mask": processor_mask})
        torch.testing.assert_close(actual.logits, expected.logits, atol=1e-5, rtol=0)
    settings = dict(max_new_tokens=4, min_new_tokens=4, num_beams=2, do_sample=False)
    generate_inputs = {k: v for k, v in inputs.items() if k != "labels"}
    assert torch.equal(
        ours.generate(**{**generate_inputs, "input_ids": processor_ids, "attention_mask": processor_mask}, **settings),
        reference.generate(**{**generate_inputs, "input_ids": compact_ids, "attention_mask": compact_mask}, **settings),
    )


def test_t5_generate_without_a_prompt_captions():
    """No prompt: ours builds the image placeholders itself; transformers needs them passed (it fails on T5)."""
    reference, model = make_reference("t5", seed=15), make_ours("t5")
    model.load_state_dict(reference.state_dict())
    pixels, qformer_ids = tiny.pixel_values(2), torch.randint(1, 64, (2, 4))
    settings = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False)
    out = model.generate(pixel_values=pixels, qformer_input_ids=qformer_ids, **settings)
    assert out.shape == (2, 4)  # decoder start + 3 new tokens
    placeholders = torch.full((2, Q), IMAGE_TOKEN)
    expected = reference.generate(pixel_values=pixels, qformer_input_ids=qformer_ids, input_ids=placeholders,
                                  attention_mask=torch.ones_like(placeholders), **settings)
    assert torch.equal(out, expected)


def test_error_neither_input_ids_nor_inputs_embeds_in_forward(model):
    inputs = batch_inputs()
    inputs.pop("input_ids")
    with pytest.raises(ValueError, match="`input_ids` is required"):
        model(**{**inputs, "attention_mask": None})


def test_return_dict_false_returns_tuples_like_transformers(model):
    inputs = batch_inputs()
    with torch.no_grad():
        expected = model(**inputs)
        output = model(**inputs, return_dict=False)
        features = model.get_image_features(inputs["pixel_values"], inputs["qformer_input_ids"], return_dict=False)
        vision = model.vision_model(inputs["pixel_values"], return_dict=False)
    assert isinstance(output, tuple) and torch.equal(output[0], expected.logits)
    assert isinstance(features, tuple) and isinstance(vision, tuple)
    torch.testing.assert_close(features[1], model.get_image_features(
        inputs["pixel_values"], inputs["qformer_input_ids"]).pooler_output, atol=0, rtol=0)


def test_vision_and_image_feature_outputs_match_transformers(pair):
    """`pooler_output` of the vision model, hidden states from the config, and `get_image_features`' fields."""
    _, reference, ours, _ = pair
    inputs = batch_inputs(seed=14)
    ours.vision_model.config.output_hidden_states = True
    try:
        with torch.no_grad():
            mine, theirs = ours.vision_model(inputs["pixel_values"]), reference.vision_model(inputs["pixel_values"])
            features = ours.get_image_features(inputs["pixel_values"], inputs["qformer_input_ids"],
                                               inputs["qformer_attention_mask"])
            expected = reference.get_image_features(inputs["pixel_values"], inputs["qformer_input_ids"],
                                                    inputs["qformer_attention_mask"])
    finally:
        ours.vision_model.config.output_hidden_states = False
    torch.testing.assert_close(mine.pooler_output, theirs.pooler_output, atol=1e-5, rtol=0)
    assert len(mine.hidden_states) == ours.config.vision_config.num_hidden_layers + 1
    for name in ("last_hidden_state", "pooler_output"):
        torch.testing.assert_close(getattr(features, name), getattr(expected, name), atol=1e-5, rtol=0, msg=name)
    assert features.qformer_outputs is not None and features.vision_outputs is not None


def test_attentions_and_hidden_states_of_every_part_match_transformers():
    """`output_attentions` / `output_hidden_states` on the full model reach the vision encoder and the Q-Former
    (self- and cross-attention). The oracle is transformers' own vision model and Q-Former called directly in eager
    mode: its full model drops them, and its Q-Former lists the cross-attention probabilities among `attentions`
    too (they are told apart here by shape). Ours stay on sdpa: a call that asks for probabilities runs eager."""
    reference = make_reference("llama")
    reference.set_attn_implementation("eager")
    ours = make_ours("llama")
    ours.load_state_dict(reference.state_dict())
    inputs = batch_inputs(seed=15)
    pixels, text, text_mask = inputs["pixel_values"], inputs["qformer_input_ids"], inputs["qformer_attention_mask"]
    flags = dict(output_attentions=True, output_hidden_states=True)
    with torch.no_grad():
        mine = ours(**inputs, **flags)
        plain = ours(**inputs)
        vision = reference.vision_model(pixels, **flags)
        queries = reference.query_tokens.expand(len(pixels), -1, -1)
        qformer = reference.qformer(input_ids=text, attention_mask=torch.cat([torch.ones(len(pixels), Q), text_mask], 1),
                                    query_embeds=queries, encoder_hidden_states=vision.last_hidden_state, **flags)
    real = inputs["attention_mask"].bool()  # pad positions differ between the LLM's eager and sdpa kernels
    torch.testing.assert_close(mine.logits[real], plain.logits[real], atol=1e-5, rtol=0)
    self_attentions = tuple(a for a in qformer.attentions if a.shape[-1] == a.shape[-2])
    expected = {("vision_outputs", "attentions"): vision.attentions,
                ("vision_outputs", "hidden_states"): vision.hidden_states,
                ("qformer_outputs", "attentions"): self_attentions,
                ("qformer_outputs", "hidden_states"): qformer.hidden_states,
                ("qformer_outputs", "cross_attentions"): qformer.cross_attentions}
    for (part, name), want in expected.items():
        got = getattr(mine[part], name)
        assert len(got) == len(want) > 0, (part, name)
        for layer, (a, b) in enumerate(zip(got, want)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=f"{part}.{name}[{layer}]")
    assert len(mine.qformer_outputs.attentions) == ours.config.qformer_config.num_hidden_layers
    assert plain.vision_outputs.attentions is None and plain.qformer_outputs.cross_attentions is None
    ours.set_attn_implementation("eager")  # transformers' configs refuse `output_attentions` under sdpa
    ours.vision_model.config.output_attentions = True  # the config's default, as transformers reads it
    with torch.no_grad():
        assert len(ours.vision_model(pixels).attentions) == 2


def test_shift_labels_are_scored_as_given():
    """Sequence-parallel training passes labels already shifted: position t is scored against shift_labels[t]."""
    model = make_ours("llama", seed=15)
    inputs = batch_inputs(seed=15)
    labels = labels_for("llama", inputs)["labels"]
    shifted = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
    with torch.no_grad():
        expected = model(**inputs, labels=labels)
        actual = model(**inputs, shift_labels=shifted)
        other = model(**inputs, labels=labels, shift_labels=labels)  # shift_labels win, as in transformers
    torch.testing.assert_close(actual.loss, expected.loss, atol=1e-6, rtol=0)
    assert not torch.allclose(other.loss, expected.loss)
    with pytest.raises(ValueError, match="`shift_labels` are for decoder-only LLMs"):
        make_ours("t5")(**batch_inputs(), labels=torch.zeros(3, 2, dtype=torch.long), shift_labels=labels)


def test_set_attn_implementation_switches_every_part():
    model = make_ours("llama", seed=16)
    inputs = batch_inputs(seed=16)
    with torch.no_grad():
        expected = model(**inputs).logits
        model.set_attn_implementation("eager")
        parts = (model.config, model.vision_model.config, model.qformer.config, model.language_model.config)
        assert [config._attn_implementation for config in parts] == ["eager"] * 4
        actual = model(**inputs).logits
    real = inputs["attention_mask"].bool()  # padded positions attend to nothing: kernels differ there by design
    torch.testing.assert_close(actual[real], expected[real], atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_static_cache_generates_the_dynamic_cache_ids(kind):
    model = make_ours(kind, seed=17)
    inputs = batch_inputs(seed=17)
    settings = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert model._can_compile_fullgraph
    expected = model.generate(**inputs, **settings)
    assert torch.equal(model.generate(**inputs, cache_implementation="static", **settings), expected)


def test_generate_from_inputs_embeds_finds_the_placeholders():
    """Without `input_ids`, the placeholders are where the embedding of the image token stands (transformers)."""
    model = make_ours("llama", seed=18)
    inputs = batch_inputs(seed=18)
    settings = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False)
    expected = model.generate(**inputs, **settings)[:, inputs["input_ids"].shape[1]:]  # the new tokens
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    actual = model.generate(**{**inputs, "input_ids": None}, inputs_embeds=embeds, **settings)
    assert torch.equal(actual, expected)
    with pytest.raises(ValueError, match="must hold exactly 4 image placeholder tokens"):
        model.generate(**{**inputs, "input_ids": None, "attention_mask": inputs["attention_mask"][:, 1:]},
                       inputs_embeds=embeds[:, 1:], **settings)


def test_fp32_modules_are_declared_where_they_exist():
    """The parts kept in fp32 (and out of quantization) are declared on the full models only, every one present."""
    from hf_instructblip import InstructBlipModel, InstructBlipQFormerModel, InstructBlipVisionModel

    assert not InstructBlipVisionModel._keep_in_fp32_modules and not InstructBlipQFormerModel._keep_in_fp32_modules
    for model_class in (InstructBlipModel, InstructBlipForConditionalGeneration):
        model = model_class(InstructBlipConfig(**tiny.config_kwargs("llama", IMAGE_TOKEN)))
        names = {name.split(".")[0] for name, _ in model.named_parameters()}
        assert set(model._keep_in_fp32_modules) <= names


def test_config_return_dict_false_gives_tuples_and_the_model_still_runs():
    model = make_ours("llama")
    inputs = batch_inputs(seed=16)
    with torch.no_grad():
        expected = model(**inputs).logits
        model.config.return_dict = False  # as transformers: the config's choice when the call makes none
        features = model.get_image_features(inputs["pixel_values"], inputs["qformer_input_ids"])
        output = model(**inputs)
    assert isinstance(features, tuple) and isinstance(output, tuple)
    torch.testing.assert_close(output[0], expected, atol=0, rtol=0)
