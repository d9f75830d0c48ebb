"""InstructBlipProcessor: parity with transformers' processor, model round trip, saving, image forms, errors."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor
from transformers import InstructBlipProcessor as ReferenceProcessor

import tiny
from hf_instructblip.model.configuration import InstructBlipConfig
from hf_instructblip.model.modeling import InstructBlipForConditionalGeneration
from hf_instructblip.model.processing import HfInstructBlipProcessor, InstructBlipProcessor, sync_image_token

Q = tiny.NUM_QUERY_TOKENS
PROMPTS = ["what is in the picture ? a red circle on a white background .", "describe the image briefly ."]
KEYS = ("input_ids", "attention_mask", "qformer_input_ids", "qformer_attention_mask", "pixel_values")


def processors(kind: str) -> tuple[InstructBlipProcessor, ReferenceProcessor]:
    """Ours and transformers' over the same components (separate LLM tokenizers: both add `<image>`). Ours
    truncates a long prompt from the left (LAVIS, and what the collator trains on); transformers' follows its
    tokenizer, so the reference's tokenizer is set to truncate from the left as well."""
    qformer = tiny.qformer_tokenizer()
    ours = InstructBlipProcessor(tiny.image_processor(), tiny.llm_tokenizer(kind), qformer, num_query_tokens=Q)
    reference_tokenizer = tiny.llm_tokenizer(kind)
    reference_tokenizer.truncation_side = "left"
    theirs = ReferenceProcessor(tiny.image_processor(), reference_tokenizer, qformer, num_query_tokens=Q)
    return ours, theirs


def real_tokens(ids: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    return [row[m.bool()].tolist() for row, m in zip(ids, mask)]


def build_model(kind: str, processor: InstructBlipProcessor, **overrides) -> InstructBlipForConditionalGeneration:
    config = InstructBlipConfig(**tiny.config_kwargs(kind, image_token_index=processor.image_token_id, **overrides))
    return tiny.randomize_(InstructBlipForConditionalGeneration(config)).eval()


# --- parity with transformers' InstructBlipProcessor -------------------------------------------------
TRUNCATION = {"none": ({}, {}), "max10": ({"truncation": True, "max_length": 10, "qformer_max_length": 10},
                                          {"truncation": True, "max_length": 10})}


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("truncation", TRUNCATION)
def test_matches_transformers_right_padded_t5(batch, truncation):
    ours_kwargs, their_kwargs = TRUNCATION[truncation]
    ours, theirs = processors("t5")
    images, texts = tiny.images(batch), PROMPTS[:batch]
    got = ours(images=images, text=texts, padding_side="right", return_tensors="pt", **ours_kwargs)
    want = theirs(images=images, text=texts, padding=True, return_tensors="pt", **their_kwargs)
    assert set(got) == set(want) == set(KEYS)
    for key in KEYS:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, msg=key)
    if truncation != "none":  # the limits were hit, so truncation was exercised
        assert got["input_ids"].shape[1] == 10 and got["qformer_input_ids"].shape[1] == 10


@pytest.mark.parametrize("truncation", TRUNCATION)
def test_matches_transformers_left_padded_llama(truncation):
    """LLM tensors and pixels are identical. transformers also left-pads the Q-Former text when the LLM
    tokenizer pads left (it shares text kwargs); ours right-pads it (LAVIS), with the same tokens per row."""
    ours_kwargs, their_kwargs = TRUNCATION[truncation]
    ours, theirs = processors("llama")
    got = ours(images=tiny.images(2), text=PROMPTS, return_tensors="pt", **ours_kwargs)
    want = theirs(images=tiny.images(2), text=PROMPTS, padding=True, return_tensors="pt", **their_kwargs)
    for key in ("input_ids", "attention_mask", "pixel_values"):
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, msg=key)
    assert real_tokens(got["qformer_input_ids"], got["qformer_attention_mask"]) == real_tokens(
        want["qformer_input_ids"], want["qformer_attention_mask"])
    short_row = got["qformer_attention_mask"][1]
    assert short_row[0] == 1 and short_row[-1] == 0  # right padded
    if truncation == "none":  # (truncated, both prompts fill `max_length`)
        assert got["attention_mask"][1, Q] == 0 and got["attention_mask"][1, -1] == 1  # LLM left padded


def test_single_prompt_matches_transformers_llama():
    ours, theirs = processors("llama")
    image, text = tiny.images(1)[0], "how many shapes are there ?"
    got = ours(images=image, text=text, return_tensors="pt")
    want = theirs(images=image, text=text, return_tensors="pt")
    for key in KEYS:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, msg=key)


def test_placeholders_lead_every_row_and_padding_side_is_overridable():
    ours, _ = processors("t5")  # this tokenizer pads right on its own
    left = ours(images=tiny.images(2), text=PROMPTS, return_tensors="pt")
    right = ours(images=tiny.images(2), text=PROMPTS, padding_side="right", return_tensors="pt")
    for batch in (left, right):
        assert (batch["input_ids"][:, :Q] == ours.image_token_id).all()
        assert ((batch["input_ids"] == ours.image_token_id).sum(dim=1) == Q).all()
    assert left["attention_mask"][1, Q] == 0 and left["attention_mask"][1, -1] == 1
    assert right["attention_mask"][1, Q] == 1 and right["attention_mask"][1, -1] == 0


def test_init_arguments_are_not_call_options():
    """An `__init__` argument named like one of transformers' processor call options (`ProcessingKwargs`:
    `padding_side`, `max_length`, `do_resize`, ...) would be ambiguous between the two; transformers' processor
    tests check the same."""
    from transformers.processing_utils import AudioKwargs, ImagesKwargs, TextKwargs, VideosKwargs

    call_options = {name for kwargs in (TextKwargs, ImagesKwargs, VideosKwargs, AudioKwargs)
                    for name in kwargs.__annotations__}
    init_arguments = set(inspect.signature(HfInstructBlipProcessor.__init__).parameters) - {"self", "kwargs"}
    assert "qformer_max_length" in init_arguments  # the signature is the one we mean
    assert not init_arguments & call_options


def test_padding_side_defaults_left_and_follows_the_attribute():
    processor, _ = processors("t5")  # this tokenizer pads right on its own
    processor.padding_side = "right"
    right = processor(images=tiny.images(2), text=PROMPTS, return_tensors="pt")
    assert right["attention_mask"][1, -1] == 0
    assert processors("t5")[0](images=tiny.images(2), text=PROMPTS, return_tensors="pt")["attention_mask"][1, Q] == 0


def test_qformer_text_is_left_truncated_to_its_own_limit():
    ours, _ = processors("llama")
    text = PROMPTS[0]
    full = ours.qformer_tokenizer(text)["input_ids"]  # [CLS] tokens... [SEP]
    got = ours(text=text, qformer_max_length=5, return_tensors="pt")
    assert got["qformer_input_ids"][0].tolist() == [full[0], *full[-4:-1], full[-1]]  # keeps the end
    llm = ours.tokenizer(text)["input_ids"]
    assert got["input_ids"][0].tolist() == llm  # the LLM prompt is untouched; no image -> no placeholders


# --- processor -> our model -> generate -----------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_generate_end_to_end_batched(kind):
    processor, _ = processors(kind)
    model = build_model(kind, processor)
    images = tiny.images(2)
    batch = processor(images=images, text=PROMPTS, return_tensors="pt")
    out = model.generate(**batch, max_new_tokens=4, do_sample=False, min_new_tokens=4)
    prompt = batch["input_ids"] if kind == "llama" else None
    answers = processor.post_process_generation(out, prompt)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    for row in range(2):  # left padding: each batched row generates what it generates alone
        single = processor(images=images[row], text=PROMPTS[row], return_tensors="pt")
        alone = model.generate(**single, max_new_tokens=4, do_sample=False, min_new_tokens=4)
        new_alone = alone[0, single["input_ids"].shape[1]:] if kind == "llama" else alone[0]
        new_batched = out[row, batch["input_ids"].shape[1]:] if kind == "llama" else out[row]
        assert new_batched.tolist() == new_alone.tolist()


def test_one_image_serves_every_prompt():
    processor, _ = processors("llama")
    shared = processor(images=tiny.images(1), text=PROMPTS, return_tensors="pt")
    paired = processor(images=tiny.images(1) * 2, text=PROMPTS, return_tensors="pt")
    assert shared["pixel_values"].shape[0] == 2
    torch.testing.assert_close(shared["pixel_values"], paired["pixel_values"], rtol=0, atol=0)


def test_sync_image_token_resizes_embeddings_when_the_token_was_added():
    processor, _ = processors("llama")
    assert processor.image_token_id == 300  # added after the 300-token BPE vocabulary
    small = tiny.text_config("llama", vocab_size=300).to_dict()
    config = InstructBlipConfig(**tiny.config_kwargs("llama", image_token_index=None, text_config=small))
    model = InstructBlipForConditionalGeneration(config).eval()
    assert sync_image_token(model, processor) is True
    assert model.config.image_token_index == 300 and model.config.text_config.vocab_size == 301
    assert model.get_input_embeddings().weight.shape[0] == 301
    logits = model(**processor(images=tiny.images(1), text=PROMPTS[1], return_tensors="pt")).logits
    assert logits.shape[-1] == 301
    assert sync_image_token(model, processor) is False  # already in range: nothing to grow


def test_sync_image_token_rejects_a_query_count_mismatch():
    processor, _ = processors("llama")
    model = build_model("llama", processor, num_query_tokens=Q + 1)
    with pytest.raises(ValueError, match="num_query_tokens"):
        sync_image_token(model, processor)


def test_post_process_generation_strips_the_echoed_prompt():
    processor, _ = processors("llama")
    prompt = processor(images=tiny.images(1), text="what colour is the circle ?", return_tensors="pt")["input_ids"]
    answer = processor.tokenizer("the circle is red .", add_special_tokens=False, return_tensors="pt")["input_ids"]
    eos = torch.tensor([[processor.tokenizer.eos_token_id]])
    generated = torch.cat([prompt, answer, eos], dim=1)
    assert processor.post_process_generation(generated, prompt) == ["the circle is red ."]
    with pytest.raises(ValueError, match="do not start with `input_ids`"):
        processor.post_process_generation(answer, prompt)


# --- saving and loading ---------------------------------------------------------------------------------
def test_save_load_round_trip_and_auto_processor(tmp_path):
    processor, _ = processors("llama")
    processor.qformer_max_length = 6
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "qformer_tokenizer" / "tokenizer_config.json").is_file()
    saved = json.loads((tmp_path / "processor_config.json").read_text())
    assert saved["auto_map"]["AutoProcessor"] == "processing.HfInstructBlipProcessor"
    assert (tmp_path / "processing.py").is_file()
    want = processor(images=tiny.images(2), text=PROMPTS, return_tensors="pt")
    for loaded in (InstructBlipProcessor.from_pretrained(tmp_path), AutoProcessor.from_pretrained(tmp_path)):
        assert type(loaded) is HfInstructBlipProcessor
        assert (loaded.qformer_max_length, loaded.num_query_tokens) == (6, Q)
        got = loaded(images=tiny.images(2), text=PROMPTS, return_tensors="pt")
        for key in KEYS:
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, msg=key)


def test_trust_remote_code_loads_the_saved_code_without_the_package(tmp_path):
    processor, _ = processors("llama")
    processor.save_pretrained(tmp_path / "proc")
    script = (
        "import sys, json; from transformers import AutoProcessor\n"
        f"p = AutoProcessor.from_pretrained({str(tmp_path / 'proc')!r}, trust_remote_code=True)\n"
        "assert 'hf_instructblip' not in sys.modules\n"
        f"print(json.dumps([type(p).__module__, p(text={PROMPTS[0]!r})['input_ids']]))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": ""}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    module, input_ids = json.loads(result.stdout.strip().splitlines()[-1])
    assert module.startswith("transformers_modules")
    assert input_ids == processor(text=PROMPTS[0])["input_ids"]


@pytest.mark.parametrize("token_in_vocab", [True, False])
def test_loads_the_official_salesforce_layout(tmp_path, token_in_vocab):
    """processor_config.json + preprocessor_config.json + root LLM tokenizer + qformer_tokenizer/."""
    llm = tiny.llm_tokenizer("llama")
    if token_in_vocab:  # the current Hub files carry `<image>`; older ones did not
        llm.add_tokens(["<image>"], special_tokens=True)
    tiny.image_processor().save_pretrained(tmp_path)
    llm.save_pretrained(tmp_path)
    tiny.qformer_tokenizer().save_pretrained(tmp_path / "qformer_tokenizer")
    (tmp_path / "processor_config.json").write_text(
        json.dumps({"num_query_tokens": Q, "processor_class": "InstructBlipProcessor"}))
    assert (tmp_path / "preprocessor_config.json").is_file()
    ours = InstructBlipProcessor.from_pretrained(tmp_path)
    theirs = ReferenceProcessor.from_pretrained(tmp_path)
    assert ours.num_query_tokens == Q and ours.image_token_id == 300
    got = ours(images=tiny.images(1), text=PROMPTS[0], return_tensors="pt")
    want = theirs(images=tiny.images(1), text=PROMPTS[0], return_tensors="pt")
    for key in KEYS:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, msg=key)


# --- image forms ----------------------------------------------------------------------------------------
def test_array_and_tensor_images_match_their_pil_image():
    processor, _ = processors("llama")
    pil = tiny.images(1, size=33)[0]
    hwc = np.asarray(pil)  # [H, W, 3] uint8
    chw = np.moveaxis(hwc, -1, 0).copy()
    want = processor.preprocess_images(pil)
    forms = [hwc, chw, torch.from_numpy(chw), hwc.astype(np.float32) / 255.0,
             torch.from_numpy(chw).float() / 255.0, torch.from_numpy(chw)[None]]
    for i, form in enumerate(forms):
        torch.testing.assert_close(processor.preprocess_images(form), want, rtol=0, atol=0, msg=f"form {i}")


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK"])
def test_pil_modes_match_transformers(mode):
    """Transparency goes onto white, as transformers >= 5.2x does (5.17 dropped alpha): we do it on every version."""
    processor, reference = processors("llama")
    rgba = np.random.default_rng(1).integers(0, 255, (30, 30, 4), dtype=np.uint8)
    image = Image.fromarray(rgba, mode="RGBA").convert(mode)
    rgb = image
    if mode == "RGBA":
        rgb = Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image).convert("RGB")
    got = processor(images=image, text="a", return_tensors="pt")["pixel_values"]
    want = reference(images=rgb, text="a", return_tensors="pt")["pixel_values"]
    assert got.shape == (1, 3, tiny.IMAGE_SIZE, tiny.IMAGE_SIZE)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# --- bad input ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "call, error, message",
    [
        (dict(), ValueError, "both are None"),
        (dict(images=tiny.images(3), text=PROMPTS), ValueError, "3 images for 2 prompts"),
        (dict(images=Image.new("RGB", (0, 0)), text="a"), ValueError, r"images\[0\]` is empty: found a 0x0"),
        (dict(images=["cat.png"], text="a"), ValueError, r"images\[0\]`: image file not found: cat.png"),
        (dict(images=[3], text="a"), TypeError, r"images\[0\]` must be a PIL image.*found int"),
        (dict(images=tiny.images(1), text=[]), ValueError, "`text` is an empty list"),
        (dict(images=[], text="a"), ValueError, "`images` is empty"),
        (dict(text=[1, "a"]), TypeError, r"non-strings at \(index: type\) \{0: 'int'\}"),
        (dict(images=np.zeros((8, 8, 3), np.float32) + 2, text="a"), ValueError, r"values in \[0, 1\]"),
        (dict(images=np.zeros((8, 8, 5), np.uint8), text="a"), ValueError, "1, 3 or 4 channels"),
        (dict(text="a", max_length=Q, truncation=True, images=tiny.images(1)), ValueError, "must exceed them"),
        (dict(text="a", padding_side="middle"), ValueError, "'left' or 'right'"),
        (dict(text="a", colour="red"), TypeError, r"Unknown keyword arguments \['colour'\]"),
    ],
    ids=["nothing", "3-images-2-texts", "0x0", "missing-file", "int-image", "empty-prompts", "empty-images", "non-string-text",
         "float-out-of-range", "5-channels", "max-length-too-small", "padding-side", "unknown-kwarg"],
)
def test_bad_input_gets_a_clear_error(call, error, message):
    processor, _ = processors("llama")
    with pytest.raises(error, match=message):
        processor(**call)


def test_bad_init_arguments():
    with pytest.raises(ValueError, match="`num_query_tokens` must be an int >= 1, found 0"):
        InstructBlipProcessor(tiny.image_processor(), tiny.llm_tokenizer(), tiny.qformer_tokenizer(),
                              num_query_tokens=0)


def test_chat_messages_become_the_users_text_and_the_same_tensors():
    """InstructBLIP has no chat format: the prompt is the last user turn's text, as LAVIS uses the instruction."""
    processor = tiny.processor("llama")
    image = tiny.images(1)[0]
    messages = [{"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "text", "text": "what colour is the circle ?"}]}]
    assert processor.apply_chat_template(messages, tokenize=False) == "what colour is the circle ?"
    assert processor.apply_chat_template([{"role": "user", "content": "is it red ?"}], tokenize=False,
                                         add_generation_prompt=True) == "is it red ?"
    chat = processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt")
    direct = processor(images=image, text="what colour is the circle ?", return_tensors="pt")
    assert sorted(chat) == sorted(direct)
    for key, value in direct.items():
        assert torch.equal(chat[key], value), key


def test_nested_image_lists_one_per_prompt(tmp_path):
    processor = tiny.processor("llama")
    images = tiny.images(2)
    nested = processor(images=[[images[0]], [images[1]]], text=PROMPTS, return_tensors="pt")
    flat = processor(images=images, text=PROMPTS, return_tensors="pt")
    assert torch.equal(nested["pixel_values"], flat["pixel_values"])
    with pytest.raises(ValueError, match=r"`images\[0\]` holds 2 images; InstructBLIP reads one image per prompt"):
        processor(images=[images, images], text=PROMPTS)
    processor.save_pretrained(tmp_path)
    assert InstructBlipProcessor.from_pretrained(tmp_path).chat_template == processor.chat_template


def test_text_options_in_text_kwargs_and_common_kwargs_equal_the_flat_ones():
    """transformers' processor conventions: options grouped per modality, or shared, give the flat call's tensors."""
    processor = tiny.processor("llama")
    images, texts = tiny.images(2), ["what colour is the square", "what"]
    flat = processor(images=images, text=texts, max_length=9, truncation=True, return_tensors="pt")
    grouped = processor(images=images, text=texts, text_kwargs={"max_length": 9, "truncation": True},
                        common_kwargs={"return_tensors": "pt"})
    assert flat["input_ids"].shape[1] == 9  # the bound was applied, not ignored
    assert set(flat) == set(grouped)
    for key in flat:
        assert torch.equal(flat[key], grouped[key]), key
    with pytest.raises(ValueError, match="two times"):
        processor(images=images, text=texts, max_length=9, text_kwargs={"max_length": 9})


def test_a_single_prompt_needs_no_pad_token():
    """transformers asks the tokenizer to pad only a batch: a tokenizer without a pad token takes one prompt."""
    processor = tiny.processor("llama")
    processor.tokenizer.pad_token = None
    single = processor(images=tiny.images(1), text="what colour", return_tensors="pt")
    assert single["attention_mask"].all()
    with pytest.raises(ValueError, match="pad"):  # a batch of different lengths does need one
        processor(images=tiny.images(2), text=["what colour", "what colour is the square"], return_tensors="pt")


def test_tokenizer_creation_defaults_are_respected_and_ours_stay_overridable():
    tokenizer = tiny.llm_tokenizer("llama")
    tokenizer.init_kwargs.update(max_length=8, truncation=True)  # as `from_pretrained(..., max_length=8, ...)`
    processor = InstructBlipProcessor(tiny.image_processor(), tokenizer, tiny.qformer_tokenizer(),
                                      num_query_tokens=tiny.NUM_QUERY_TOKENS)
    text = "what colour is the square in the picture"
    assert len(processor(images=tiny.images(1), text=text)["input_ids"][0]) == 8  # the tokenizer's bound
    assert len(processor(images=tiny.images(1), text=text, max_length=10)["input_ids"][0]) == 10  # the call wins
    texts = ["what", "what colour is it"]
    left = processor(text=texts, max_length=None, truncation=False)["attention_mask"]
    right = processor(text=texts, padding_side="right", max_length=None, truncation=False)["attention_mask"]
    assert left[0][0] == 0 and right[0][-1] == 0  # our left padding by default, the call's side when given
    qformer = processor(text=texts, qformer_max_length=3)["qformer_input_ids"]
    assert max(len(row) for row in qformer) == 3  # the processor's own Q-Former bound is a call option too


def test_call_signature_follows_processor_conventions():
    """No `videos` / `audio` parameters it cannot take, typed keyword options (transformers' processor tests read
    both), and `videos=None` / `audio=None` still accepted as chat templates pass them."""
    import inspect

    processor = tiny.processor("llama")
    parameters = inspect.signature(processor.__call__).parameters
    assert "videos" not in parameters and "audio" not in parameters
    assert "InstructBlipProcessorKwargs" in str(parameters["kwargs"].annotation)
    assert processor(images=tiny.images(1), text="what", videos=None, audio=None)["input_ids"]
    with pytest.raises(ValueError, match="InstructBlipVideoProcessor"):
        processor(text="what", videos=[tiny.images(2)])


def test_saving_leaves_the_processor_equal_to_the_one_loaded_back(tmp_path):
    processor = tiny.processor("llama")
    before = processor.to_dict()
    processor.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "processor_config.json").read_text())["auto_map"]  # remote code still wired
    assert processor.to_dict() == before
    assert InstructBlipProcessor.from_pretrained(tmp_path).to_dict() == processor.to_dict()
