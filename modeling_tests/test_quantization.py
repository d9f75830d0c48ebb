"""Quantized training (QLoRA-style): a quantized frozen LLM + LoRA adapters + the trainable Q-Former.

One table of quantizers that run on CPU drives the same checks: which weights the quantizer converted (the frozen
image encoder's and LLM's Linear layers; never the Q-Former, queries or projection), the documented opt-out for the
image encoder, and a few optimizer steps of the recipe. Each case skips when its quantizer package is missing.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import tiny
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from hf_instructblip import InstructBlipConfig, InstructBlipForConditionalGeneration, InstructBlipModel
from hf_instructblip.training.collator import InstructBlipDataCollator
from hf_instructblip.training.freezing import freeze_for_instruction_tuning, is_quantized, quantized_parameter_names

TRAINED_PREFIXES = ("qformer.", "query_tokens", "language_projection.")


def _bnb(skip: list[str] | None, **kwargs):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(llm_int8_skip_modules=skip, **kwargs)


def _quanto(skip: list[str] | None):
    from transformers import QuantoConfig

    return QuantoConfig(weights="int8", modules_to_not_convert=skip)


def _torchao(skip: list[str] | None):
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import TorchAoConfig

    return TorchAoConfig(Int8WeightOnlyConfig(), modules_to_not_convert=skip)


# case -> (package the quantizer needs, quantization_config factory taking the user's skip list)
QUANTIZERS: dict[str, tuple[str, Callable]] = {
    "bnb-8bit": ("bitsandbytes", lambda skip: _bnb(skip, load_in_8bit=True)),
    "bnb-4bit": ("bitsandbytes", lambda skip: _bnb(skip, load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)),
    "quanto-int8": ("optimum.quanto", _quanto),
    "torchao-int8": ("torchao", _torchao),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[str, InstructBlipForConditionalGeneration]:
    """A tiny random Llama-backed model saved in full precision, and the model itself (the reference)."""
    processor = tiny.processor("llama")
    # Widths bitsandbytes' 4-bit CPU path runs: on a CPU with AVX512-BF16, bitsandbytes >= 0.50 repacks a frozen
    # Linear4bit's weight for its fused kernel on the first no-grad forward, which needs out_features % 32 == 0 and
    # in_features % 64 == 0 (the quantization block); tiny's 32-wide layers fail there (every released checkpoint
    # passes). The Q-Former stays tiny: it is never quantized.
    config = InstructBlipConfig(**tiny.config_kwargs(
        "llama", image_token_index=processor.image_token_id,
        vision_config=tiny.vision_config(hidden_size=64, intermediate_size=128),
        text_config=tiny.text_config("llama", hidden_size=64, intermediate_size=128).to_dict()))
    torch.manual_seed(0)
    model = tiny.randomize_(InstructBlipForConditionalGeneration(config))
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    return str(path), model


def load_quantized(case: str, path: str, skip: list[str] | None = None) -> InstructBlipForConditionalGeneration:
    package, make_config = QUANTIZERS[case]
    pytest.importorskip(package)
    return InstructBlipForConditionalGeneration.from_pretrained(path, quantization_config=make_config(skip))


def linear_weights(model: nn.Module, *prefixes: str) -> set[str]:
    """`<name>.weight` of every Linear layer under `prefixes` (the full-precision model's layout)."""
    return {f"{name}.weight" for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and name.startswith(prefixes)}


def stored(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Copies of what a weight stores: itself, or the inner tensors (data, scales) of a quantized tensor subclass."""
    if is_traceable_wrapper_subclass(tensor):
        names, _ = tensor.__tensor_flatten__()
        return [inner for name in names for inner in stored(getattr(tensor, name))]
    return [tensor.detach().clone()]


def snapshot(model: nn.Module) -> dict[str, list[torch.Tensor]]:
    return {name: stored(param) for name, param in model.named_parameters()}


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("case", list(QUANTIZERS))
def test_quantizers_convert_only_the_frozen_parts(saved, case):
    path, reference = saved
    model = load_quantized(case, path)
    # The vision encoder and the LLM are quantized; the LLM's head stays full precision (transformers' default skip).
    expected = linear_weights(reference, "vision_model.", "language_model.") - {"language_model.lm_head.weight"}
    assert quantized_parameter_names(model) == expected
    for name, param in model.named_parameters():
        if name.startswith(TRAINED_PREFIXES):
            assert type(param.data) is torch.Tensor and param.dtype == torch.float32, name
    assert {type(m) for m in model.qformer.modules() if isinstance(m, nn.Linear)} == {nn.Linear}
    assert type(model.language_projection) is nn.Linear


@pytest.mark.parametrize("case", list(QUANTIZERS))
def test_skip_list_keeps_the_vision_encoder_in_full_precision(saved, case):
    path, reference = saved
    # A user skip list replaces transformers' default skips, so the head is listed again, by its full name: torchao
    # matches the names of weights, where a bare "lm_head" suffix never matches.
    model = load_quantized(case, path, skip=["vision_model", "language_model.lm_head"])
    expected = linear_weights(reference, "language_model.") - {"language_model.lm_head.weight"}
    assert quantized_parameter_names(model) == expected


@pytest.mark.parametrize("case", list(QUANTIZERS))
def test_qlora_recipe_trains_qformer_and_adapters_only(saved, case):
    from peft import LoraConfig, get_peft_model

    path, _ = saved
    model = load_quantized(case, path)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=r"language_model\..*\.(q_proj|v_proj)")
    peft_model = get_peft_model(model, lora)
    table = freeze_for_instruction_tuning(peft_model)  # after get_peft_model, which freezes all but the adapters
    trainable = {name for name, param in peft_model.named_parameters() if param.requires_grad}
    base = "base_model.model."
    assert trainable and all(name.startswith(tuple(base + p for p in TRAINED_PREFIXES)) or "lora_" in name
                             for name in trainable)
    assert any("lora_B" in name for name in trainable) and table.trainable == sum(
        p.numel() for p in peft_model.parameters() if p.requires_grad)

    processor = tiny.processor("llama")
    collator = InstructBlipDataCollator(processor, decoder_only=True)
    records = [{"image": image, "instruction": instruction, "answer": answer} for image, (instruction, answer) in
               zip(tiny.images(2), [("what is in the picture ?", "a red circle ."), ("how many shapes ?", "two .")])]
    batch = collator(records)
    peft_model.train()
    # bitsandbytes (>= 0.50, AVX512-BF16 CPUs) repacks the frozen vision encoder's 4-bit weights for its CPU kernel on
    # their first forward without gradients flowing in: run one training forward (no step) before the snapshot so the
    # comparison sees what training changed. Not under no_grad: that would repack the LLM's frozen layers as well, and
    # bitsandbytes' packed CPU path has no backward, so the Q-Former would silently get no gradient.
    peft_model(**batch)
    before = snapshot(peft_model)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(4):
        loss = peft_model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    after = snapshot(peft_model)

    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses
    changed = {name for name in before if not same(before[name], after[name])}
    assert any(name.startswith(base + "qformer.") for name in changed)
    assert any("lora_B" in name for name in changed)
    assert changed <= trainable  # frozen weights, quantized or not, are bit-identical
    quantized = {name for name, param in peft_model.named_parameters() if is_quantized(param)}
    assert quantized and not quantized & changed
    assert not any(".vision_model." in name for name in changed)


def test_freezing_refuses_a_quantized_trained_part(saved, monkeypatch):
    pytest.importorskip("bitsandbytes")
    path, _ = saved
    # a class that declares only the queries (as transformers' InstructBLIP): the quantizer converts the Q-Former too
    monkeypatch.setattr(InstructBlipModel, "_keep_in_fp32_modules", ["query_tokens"])
    model = load_quantized("bnb-8bit", path)
    with pytest.raises(ValueError, match=r"`model`.*full-precision.*quantized.*qformer.*Int8Params"):
        freeze_for_instruction_tuning(model)
    assert all(not p.requires_grad for p in model.qformer.parameters() if is_quantized(p))  # nothing was changed


def test_half_precision_quantized_model_trains_the_qformer_in_fp32(saved):
    """The usual GPU load (fp16 compute, 8-bit LLM) keeps the trained parts in fp32, as LAVIS trains the Q-Former;
    half-precision image features enter the fp32 Q-Former and its output enters the fp16 LLM."""
    pytest.importorskip("bitsandbytes")
    path, _ = saved
    model = InstructBlipForConditionalGeneration.from_pretrained(
        path, dtype=torch.float16, quantization_config=QUANTIZERS["bnb-8bit"][1](None))
    dtypes = {name: param.dtype for name, param in model.named_parameters() if not is_quantized(param)}
    assert {dtype for name, dtype in dtypes.items() if name.startswith(TRAINED_PREFIXES)} == {torch.float32}
    assert {dtype for name, dtype in dtypes.items() if not name.startswith(TRAINED_PREFIXES)} == {torch.float16}
    freeze_for_instruction_tuning(model)
    batch = InstructBlipDataCollator(tiny.processor("llama"), decoder_only=True)(
        [{"image": image, "instruction": "what is in the picture ?", "answer": "a red circle ."}
         for image in tiny.images(2)])
    batch["pixel_values"] = batch["pixel_values"].to(torch.float16)
    loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.qformer.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
