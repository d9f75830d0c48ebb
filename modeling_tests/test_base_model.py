"""The base model (no LM head): `InstructBlipModel` and the full model's `base_model`, which TRL's and Liger's fused
heads call for the LLM's last hidden states."""

from __future__ import annotations

import pytest
import tiny
import torch
from transformers import InstructBlipConfig as RefConfig
from transformers import InstructBlipForConditionalGeneration as RefFull
from transformers import InstructBlipModel as RefBase

from hf_instructblip import InstructBlipConfig, InstructBlipForConditionalGeneration, InstructBlipModel

IMAGE_TOKEN = 300  # the tiny processor's "<image>"


def saved_full_model(kind: str, tmp_path) -> InstructBlipForConditionalGeneration:
    model = InstructBlipForConditionalGeneration(InstructBlipConfig(**tiny.config_kwargs(kind, IMAGE_TOKEN)))
    model = tiny.randomize_(model).eval()
    model.save_pretrained(tmp_path)
    return model


def batch(kind: str) -> dict:
    inputs = dict(tiny.processor(kind)(images=tiny.images(2), text=["a red square", "what is it"],
                                       return_tensors="pt"))
    if kind == "t5":
        inputs["decoder_input_ids"] = torch.tensor([[0, 5, 6, 7], [0, 8, 9, 10]])
    return inputs


def llm_last_hidden(full: InstructBlipForConditionalGeneration, inputs: dict) -> torch.Tensor:
    """The oracle: the LLM's own last hidden state, read from the full model's `output_hidden_states`."""
    outputs = full(**inputs, output_hidden_states=True).language_model_outputs
    return outputs.decoder_hidden_states[-1] if "decoder_input_ids" in inputs else outputs.hidden_states[-1]


@pytest.mark.parametrize("kind", tiny.LLM_KINDS)
@torch.no_grad()
def test_base_model_loads_the_full_checkpoint_and_returns_the_llm_hidden_states(kind, tmp_path):
    full = saved_full_model(kind, tmp_path)
    base, info = InstructBlipModel.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == set() and info["mismatched_keys"] == set()
    assert not info["unexpected_keys"] - {"language_model.lm_head.weight"}
    assert not hasattr(base.language_model, "lm_head")
    inputs = batch(kind)
    expected = llm_last_hidden(full, inputs)
    hidden = base.eval()(**inputs).last_hidden_state
    torch.testing.assert_close(hidden, expected, rtol=0, atol=0)
    if kind != "t5":  # the head on these hidden states gives the full model's logits
        torch.testing.assert_close(full.get_output_embeddings()(hidden), full(**inputs).logits, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["llama", "opt"])
@torch.no_grad()
def test_full_model_base_model_runs_up_to_the_llm_body(kind, tmp_path):
    full = saved_full_model(kind, tmp_path)
    keys = list(full.state_dict())
    inputs = batch(kind)
    output = full.base_model(**inputs, use_cache=False)
    torch.testing.assert_close(output.last_hidden_state, llm_last_hidden(full, inputs), rtol=0, atol=0)
    assert output.vision_outputs is not None and output.qformer_outputs is not None
    assert list(full.state_dict()) == keys  # the view adds no module: the checkpoint layout is unchanged
    assert full.base_model.get_image_features(inputs["pixel_values"], inputs["qformer_input_ids"]).pooler_output.shape == (2, 4, 32)


@torch.no_grad()
def test_t5_base_model_matches_transformers(tmp_path):
    """transformers' own base model is the oracle where it loads the checkpoint (T5's keys are the same in both)."""
    ref = tiny.randomize_(RefFull(RefConfig(**tiny.config_kwargs("t5", IMAGE_TOKEN)))).eval()
    ref.save_pretrained(tmp_path)
    theirs = RefBase.from_pretrained(tmp_path).eval()
    ours = InstructBlipModel.from_pretrained(tmp_path).eval()
    inputs = {key: value[:1] for key, value in batch("t5").items()}  # one row: no padding (ours moves T5's pads)
    expected = theirs(**inputs).language_model_outputs.last_hidden_state
    torch.testing.assert_close(ours(**inputs).last_hidden_state, expected, rtol=0, atol=1e-6)


def test_t5_base_model_needs_decoder_ids_and_the_full_models_refuses_fused_heads():
    """A fused LM head shifts labels the decoder-only way: the full model's `base_model` refuses a T5 LLM."""
    config = InstructBlipConfig(**tiny.config_kwargs("t5", IMAGE_TOKEN))
    inputs = batch("t5")
    with pytest.raises(ValueError, match="InstructBlipSFTTrainer"):
        InstructBlipForConditionalGeneration(config).base_model(**inputs)
    inputs.pop("decoder_input_ids")
    with pytest.raises(ValueError, match="decoder_input_ids"):
        InstructBlipModel(config).eval()(**inputs)


def test_base_model_save_load_round_trip(tmp_path):
    base = tiny.randomize_(InstructBlipModel(InstructBlipConfig(**tiny.config_kwargs("llama", IMAGE_TOKEN))))
    base.save_pretrained(tmp_path)
    again, info = InstructBlipModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values())
    for (name, a), (_, b) in zip(base.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
