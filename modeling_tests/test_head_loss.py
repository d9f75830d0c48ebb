"""Fused LM-head cross-entropy: equal to logits + cross-entropy (values and gradients), and used by the model's
training forward exactly when it is safe (frozen plain head, known architecture)."""

from __future__ import annotations

import pytest
import tiny
import torch
from test_modeling import IMAGE_TOKEN, batch_inputs, labels_for, make_ours, make_reference
from transformers import AutoConfig

from hf_instructblip import (
    InstructBlipConfig,
    InstructBlipForConditionalGeneration,
    freeze_for_instruction_tuning,
)
from hf_instructblip.model import loss as head_loss
from hf_instructblip.model.loss import frozen_head_cross_entropy


def reference_token_losses(hidden, weight, bias, labels):
    logits = torch.nn.functional.linear(hidden, weight, bias).float()
    losses = torch.nn.functional.cross_entropy(logits.flatten(0, -2), labels.flatten(), reduction="none")
    return losses.view(labels.shape)


def head_case(dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(3, 5, 16, generator=gen) * 2).to(dtype)
    weight = torch.randn(50, 16, generator=gen).to(dtype)
    bias = torch.randn(50, generator=gen).to(dtype)
    labels = torch.randint(0, 50, (3, 5), generator=gen)
    labels[0, :2] = labels[2, -1] = -100
    upstream = torch.rand(3, 5, generator=gen)  # a per-token weight on each loss exercises backward fully
    return hidden, weight, bias, labels, upstream


def losses_and_grad(fn, hidden, weight, bias, labels, upstream):
    hidden = hidden.clone().requires_grad_()
    losses = fn(hidden, weight, bias, labels)
    (losses * upstream).sum().backward()
    return losses.detach(), hidden.grad


@pytest.mark.parametrize("chunk_elements", [50, 150, 2**20], ids=["one-row-chunks", "three-row-chunks", "one-chunk"])
def test_equals_logits_then_cross_entropy(monkeypatch, chunk_elements):
    monkeypatch.setattr(head_loss, "CHUNK_ELEMENTS", chunk_elements)
    case = head_case()
    losses, grad = losses_and_grad(frozen_head_cross_entropy, *case)
    expected_losses, expected_grad = losses_and_grad(reference_token_losses, *case)
    labels = case[3]
    assert torch.all(losses[labels == -100] == 0) and torch.all(grad[labels == -100] == 0)
    torch.testing.assert_close(losses, expected_losses.masked_fill(labels == -100, 0), atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(grad, expected_grad, atol=1e-6, rtol=1e-5)


def test_bfloat16_matches_bfloat16_logits():
    case = head_case(torch.bfloat16, seed=1)
    losses, grad = losses_and_grad(frozen_head_cross_entropy, *case)
    expected_losses, expected_grad = losses_and_grad(reference_token_losses, *case)
    assert losses.dtype == torch.float32 and grad.dtype == torch.bfloat16
    keep = case[3] != -100
    torch.testing.assert_close(losses[keep], expected_losses[keep], atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(grad.float(), expected_grad.float(), atol=2e-2, rtol=2e-2)


def test_without_grad_it_only_scores():
    hidden, weight, bias, labels, _ = head_case()
    losses = frozen_head_cross_entropy(hidden, weight, bias, labels)
    assert losses.grad_fn is None
    torch.testing.assert_close(losses, reference_token_losses(hidden, weight, bias, labels.clamp_min(0)) * (labels != -100))


def test_labels_must_match_hidden():
    hidden, weight, bias, labels, _ = head_case()
    with pytest.raises(ValueError, match=r"`labels` must have shape \(3, 5\) to match `hidden`, found \(3, 4\)"):
        frozen_head_cross_entropy(hidden, weight, bias, labels[:, :4])


# --- in the model -------------------------------------------------------------------------------------------
def frozen_pair(kind):
    """transformers' model and ours with the same weights, vision + LLM frozen, in training mode."""
    reference, ours = make_reference(kind), make_ours(kind)
    ours.load_state_dict(reference.state_dict())
    reference.vision_model.requires_grad_(False)
    reference.language_model.requires_grad_(False)
    freeze_for_instruction_tuning(ours)
    return reference.train(), ours.train()


def trained_grads(model):
    return {name: p.grad for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kind", tiny.LLM_KINDS)
def test_training_loss_and_gradients_match_reference(kind):
    """The fused path (logits None) gives transformers' loss and the same Q-Former gradients."""
    reference, ours = frozen_pair(kind)
    inputs = batch_inputs(seed=21)
    inputs.update(labels_for(kind, inputs))
    expected, actual = reference(**inputs), ours(**inputs, fused_head_loss=True)
    assert actual.logits is None and actual.token_losses is not None
    expected.loss.backward()
    actual.loss.backward()
    torch.testing.assert_close(actual.loss, expected.loss, atol=1e-5, rtol=0)
    expected_grads, actual_grads = trained_grads(reference), trained_grads(ours)
    assert expected_grads.keys() == actual_grads.keys()
    for name, grad in expected_grads.items():
        torch.testing.assert_close(actual_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_fused_and_unfused_agree_on_loss_token_losses_and_num_items(kind):
    _, model = frozen_pair(kind)
    inputs = batch_inputs(seed=22)
    inputs.update(labels_for(kind, inputs), num_items_in_batch=torch.tensor(40))
    a, b = model(**inputs, fused_head_loss=True), model(**inputs)
    assert a.logits is None and b.logits is not None
    torch.testing.assert_close(a.loss, b.loss, atol=1e-6, rtol=0)
    torch.testing.assert_close(a.token_losses, b.token_losses, atol=1e-5, rtol=0)
    torch.testing.assert_close(a.loss * 40, a.token_losses.sum(), atol=1e-4, rtol=0)


def head_widths(model) -> list[int]:
    """Records the number of positions each LM-head call returns: 0 on the fused path, L when it falls back."""
    widths = []
    model.language_model.get_output_embeddings().register_forward_hook(lambda m, a, out: widths.append(out.shape[1]))
    return widths


def test_trainable_head_falls_back_to_logits_and_still_trains():
    _, model = frozen_pair("llama")
    inputs = batch_inputs(seed=23)
    inputs.update(labels_for("llama", inputs))
    expected = model(**inputs).loss
    model.language_model.get_output_embeddings().requires_grad_(True)
    widths = head_widths(model)
    output = model(**inputs, fused_head_loss=True)
    assert output.logits is None and widths == [inputs["input_ids"].shape[1]]  # fell back, logits not returned
    torch.testing.assert_close(output.loss, expected, atol=1e-6, rtol=0)
    output.loss.backward()
    assert model.language_model.get_output_embeddings().weight.grad is not None


@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_output_contract_depends_on_the_call_alone(kind):
    """No labels: logits, no loss. Labels: loss + token_losses, full logits unless `fused_head_loss=True`. Training
    or eval mode changes nothing of this."""
    _, model = frozen_pair(kind)
    inputs = batch_inputs(seed=24)
    labels = labels_for(kind, inputs)
    length = (labels["labels"] if kind == "t5" else inputs["input_ids"]).shape[1]
    vocab = model.config.text_config.vocab_size
    for mode in (True, False):
        model.train(mode)
        plain = model(**inputs, **({"decoder_input_ids": labels["labels"].clamp_min(0)} if kind == "t5" else {}))
        assert plain.loss is None and plain.token_losses is None and plain.logits.shape == (3, length, vocab)
        full = model(**inputs, **labels)
        assert full.logits.shape == (3, length, vocab)
        assert full.token_losses.shape == (3, length - (kind != "t5")) and not full.token_losses.requires_grad
        fused = model(**inputs, **labels, fused_head_loss=True)
        assert fused.logits is None
        torch.testing.assert_close(fused.loss, full.loss, atol=1e-6, rtol=0)
        torch.testing.assert_close(fused.token_losses, full.token_losses, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_all_labels_ignored_give_a_zero_loss_and_zero_gradients(kind):
    """One fully masked micro-batch must not turn the run's loss into NaN."""
    _, model = frozen_pair(kind)
    inputs = batch_inputs(seed=32)
    inputs.update(labels_for(kind, inputs))
    inputs["labels"] = torch.full_like(inputs["labels"], -100)
    for fused, num_items in ((True, None), (False, None), (True, torch.tensor(0))):
        model.zero_grad()
        output = model(**inputs, fused_head_loss=fused, num_items_in_batch=num_items)
        assert output.loss.item() == 0.0
        output.loss.backward()
        assert all(not p.grad.any() for p in model.parameters() if p.grad is not None)


def test_head_is_restored_after_the_forward_even_on_error():
    _, model = frozen_pair("t5")
    head = model.language_model.get_output_embeddings()
    inputs = batch_inputs(seed=25)
    inputs.update(labels_for("t5", inputs), fused_head_loss=True)
    model(**inputs)
    assert not head._forward_pre_hooks
    with pytest.raises(ValueError, match="`labels` must have shape"):
        model(**{**inputs, "decoder_input_ids": inputs["labels"][:, :2].clamp_min(0)})  # 2 positions, 4 labels
    assert not head._forward_pre_hooks
    assert head(torch.zeros(1, 32)).shape == (1, 320)


def frozen_ours(text_config, seed=0):
    """Ours with any tiny LLM config, vision + LLM frozen, training mode (all dropout rates 0)."""
    config = InstructBlipConfig(**tiny.config_kwargs("llama", IMAGE_TOKEN, text_config=text_config.to_dict()))
    model = tiny.randomize_(InstructBlipForConditionalGeneration(config), seed)
    freeze_for_instruction_tuning(model)
    return model.train()


def fused_and_unfused(model, inputs):
    """(loss, trained grads) with the fused head loss, then with full logits."""
    results = []
    for fused in (True, False):
        model.zero_grad()
        output = model(**inputs, fused_head_loss=fused)
        assert (output.logits is None) == fused
        output.loss.backward()
        results.append((output.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    return results


def assert_same(results, atol=1e-5, rtol=1e-4):
    (loss, grads), (expected_loss, expected_grads) = results
    torch.testing.assert_close(loss, expected_loss, atol=atol, rtol=0)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=atol, rtol=rtol, msg=name)


LLAMA_LIKE = dict(vocab_size=320, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2, max_position_embeddings=256)
OTHER_LLMS = {
    "mistral": dict(LLAMA_LIKE, sliding_window=None),
    "qwen2": dict(LLAMA_LIKE),
    "mt5": dict(vocab_size=320, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_decoder_layers=2, num_heads=4,
                dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=2,
                feed_forward_proj="gated-gelu", tie_word_embeddings=False),
}


@pytest.mark.parametrize("model_type", sorted(OTHER_LLMS))
def test_other_allow_listed_llms_end_with_the_head(model_type):
    """Nothing after `lm_head` in their forward (what the allow-list asserts): fused == full logits."""
    model = frozen_ours(AutoConfig.for_model(model_type, **OTHER_LLMS[model_type]))
    inputs = batch_inputs(seed=26)
    inputs.update(labels_for("t5" if model_type == "mt5" else "llama", inputs))
    assert_same(fused_and_unfused(model, inputs))


def test_llm_outside_the_allow_list_takes_its_loss_from_the_logits():
    """Gemma-2 soft-caps its logits after the head: the fused path would skip that, so it is not taken."""
    config = AutoConfig.for_model("gemma2", **dict(LLAMA_LIKE, head_dim=8, final_logit_softcapping=30.0))
    model = frozen_ours(config)
    inputs = batch_inputs(seed=27)
    inputs.update(labels_for("llama", inputs))
    widths = head_widths(model)
    assert_same(fused_and_unfused(model, inputs))
    assert widths == [inputs["input_ids"].shape[1]] * 2


@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_chunks_and_num_items_in_batch_inside_the_model(monkeypatch, kind):
    monkeypatch.setattr(head_loss, "CHUNK_ELEMENTS", 1)
    monkeypatch.setattr(head_loss, "MIN_CHUNK_ROWS", 3)  # chunks of 3 rows
    _, model = frozen_pair(kind)
    inputs = batch_inputs(seed=28)
    inputs.update(labels_for(kind, inputs), num_items_in_batch=torch.tensor(40))
    assert_same(fused_and_unfused(model, inputs))


def test_bfloat16_model_gradients_match_full_logits():
    _, model = frozen_pair("llama")
    model.to(torch.bfloat16)
    inputs = batch_inputs(seed=29)
    inputs.update(labels_for("llama", inputs), pixel_values=inputs["pixel_values"].to(torch.bfloat16))
    assert_same(fused_and_unfused(model, inputs), atol=2e-2, rtol=5e-2)


def test_head_with_an_unusable_weight_at_call_time_falls_back(monkeypatch):
    """An empty (not yet gathered) or trainable weight seen inside the call: the head computes logits as usual."""
    _, model = frozen_pair("t5")
    inputs = batch_inputs(seed=31)
    inputs.update(labels_for("t5", inputs))
    expected = model(**inputs).loss
    monkeypatch.setattr(head_loss, "_usable_here", lambda module, hidden: False)
    widths = head_widths(model)
    output = model(**inputs, fused_head_loss=True)
    assert output.logits is None and widths == [inputs["labels"].shape[1]]  # the head computed logits
    torch.testing.assert_close(output.loss, expected, atol=1e-6, rtol=0)
    monkeypatch.undo()
    head = model.language_model.get_output_embeddings()
    assert not head_loss._usable_here(head, torch.zeros(1, 31))  # width mismatch, as an empty shard has
    assert head_loss._usable_here(head, torch.zeros(1, 32))
    head.weight.requires_grad_(True)
    assert not head_loss._usable_here(head, torch.zeros(1, 32))


def test_offloaded_head_falls_back_to_logits():
    """accelerate's offload hook loads the weight after our pre-hook: the head must then run as usual."""
    from accelerate import cpu_offload

    _, model = frozen_pair("llama")
    inputs = batch_inputs(seed=30)
    inputs.update(labels_for("llama", inputs))
    expected = model(**inputs).loss
    cpu_offload(model.language_model.get_output_embeddings(), execution_device="cpu")
    assert model.language_model.get_output_embeddings().weight.is_meta
    widths = head_widths(model)
    output = model(**inputs, fused_head_loss=True)
    assert output.logits is None and widths == [inputs["input_ids"].shape[1]]  # the head computed logits
    torch.testing.assert_close(output.loss, expected, atol=1e-6, rtol=0)
