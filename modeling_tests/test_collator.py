"""InstructBlipDataCollator: exact LAVIS token layout, truncation, padding, Q-Former text, bad records.

Expected ids are literal numbers read off the tiny tokenizers (see `tiny.llm_tokenizer`), not produced by the
collator; transformers' InstructBlipProcessor is the oracle for the prompt part, the Q-Former text and pixels.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
import tiny
from transformers import InstructBlipProcessor

from hf_instructblip import InstructBlipProcessor as OurProcessor
from hf_instructblip.training.collator import InstructBlipDataCollator

I = 300  # "<image>" id once added to the tiny LLM tokenizer (vocab 300)
X = -100


def make_processor(kind: str) -> OurProcessor:
    # the processor adds "<image>" to the tokenizer
    return OurProcessor(tiny.image_processor(), tiny.llm_tokenizer(kind), tiny.qformer_tokenizer(),
                        num_query_tokens=tiny.NUM_QUERY_TOKENS)


def records() -> list[dict]:
    # LLM ids: "what colour is the circle ?" = [287, 269, 82, 79, 298, 85, 271, 267, 289, 270]
    # "the circle is red ." = [87, 75, 72, 289, 271, 224, 263, 71, 266]; "is it red ?" = [293, 264, 87, 224, 263,
    # 71, 270]; "yes" = [92, 272]. Q-Former: [2, 50, 18, 26, 45, 17, 7, 3], [2, 26, 27, 35, 7, 3], [2, 1, 3].
    images = tiny.images(3)
    return [
        {"image": images[0], "instruction": "what colour is the circle ?", "answer": "the circle is red ."},
        {"image": images[1], "instruction": "is it red ?", "answer": "yes"},
        {"image": images[2], "instruction": "yes", "answer": "is it red ?"},
    ]


@pytest.fixture(scope="module", params=["llama", "t5"])
def processor(request):
    return make_processor(request.param)


def collate(kind: str, **kwargs) -> dict:
    collator = InstructBlipDataCollator(make_processor(kind), decoder_only=kind != "t5", max_input_length=8,
                                        max_output_length=4, qformer_max_length=7, **kwargs)
    return collator(records())


def test_decoder_only_layout_token_by_token():
    batch = collate("llama")
    # [image x 4][bos][prompt, last 7 tokens][answer, first 3 tokens][eos][pad], right padded
    assert batch["input_ids"].tolist() == [
        [I, I, I, I, 1, 79, 298, 85, 271, 267, 289, 270, 87, 75, 72, 2],
        [I, I, I, I, 1, 293, 264, 87, 224, 263, 71, 270, 92, 272, 2, 0],
        [I, I, I, I, 1, 92, 272, 293, 264, 87, 2, 0, 0, 0, 0, 0],
    ]
    assert batch["labels"].tolist() == [
        [X] * 12 + [87, 75, 72, 2],
        [X] * 12 + [92, 272, 2, X],
        [X] * 7 + [293, 264, 87, 2] + [X] * 5,
    ]
    assert batch["attention_mask"].tolist() == [[1] * 16, [1] * 15 + [0], [1] * 11 + [0] * 5]


def test_encoder_decoder_layout_token_by_token():
    batch = collate("t5")
    # encoder: [image x 4][prompt, last 7 tokens][eos][pad]; labels: [answer, first 3 tokens][eos], pad -> -100
    assert batch["input_ids"].tolist() == [
        [I, I, I, I, 79, 298, 85, 271, 267, 289, 270, 2],
        [I, I, I, I, 293, 264, 87, 224, 263, 71, 270, 2],
        [I, I, I, I, 92, 272, 2, 0, 0, 0, 0, 0],
    ]
    assert batch["attention_mask"].tolist() == [[1] * 12, [1] * 12, [1] * 7 + [0] * 5]
    assert batch["labels"].tolist() == [[87, 75, 72, 2], [92, 272, 2, X], [293, 264, 87, 2]]


@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_qformer_text_left_truncated_keeping_specials(kind):
    batch = collate(kind)
    assert batch["qformer_input_ids"].tolist() == [
        [2, 18, 26, 45, 17, 7, 3],  # [CLS] + last 5 text tokens + [SEP]
        [2, 26, 27, 35, 7, 3, 0],
        [2, 1, 3, 0, 0, 0, 0],
    ]
    assert batch["qformer_attention_mask"].tolist() == [[1] * 7, [1] * 6 + [0], [1] * 3 + [0] * 4]


def test_train_on_prompt_labels_prompt_but_not_bos_or_image():
    batch = collate("llama", train_on_prompt=True)
    assert batch["labels"][0].tolist() == [X] * 5 + [79, 298, 85, 271, 267, 289, 270, 87, 75, 72, 2]
    assert batch["labels"][2].tolist() == [X] * 5 + [92, 272, 293, 264, 87, 2] + [X] * 5


def test_default_lengths_are_lavis():
    collator = InstructBlipDataCollator(make_processor("llama"), decoder_only=True)
    assert (collator.max_input_length, collator.max_output_length, collator.qformer_max_length) == (128, 256, 128)
    assert collator.train_on_prompt is False


def test_prompt_part_matches_transformers_processor(processor):
    """Untruncated, the collator's prompt part, Q-Former text and pixels equal transformers' processor output."""
    decoder_only = processor.tokenizer.bos_token_id is not None
    oracle = InstructBlipProcessor(image_processor=processor.image_processor, tokenizer=processor.tokenizer,
                                   qformer_tokenizer=processor.qformer_tokenizer,
                                   num_query_tokens=processor.num_query_tokens)
    collator = InstructBlipDataCollator(processor, decoder_only=decoder_only)
    for record in records():
        ours = collator([record])
        theirs = oracle(images=record["image"], text=record["instruction"], return_tensors="pt")
        prompt = theirs["input_ids"][0].tolist()
        if decoder_only:
            assert ours["input_ids"][0, : len(prompt)].tolist() == prompt
            assert ours["labels"][0, : len(prompt)].tolist() == [X] * len(prompt)
        else:
            assert ours["input_ids"][0].tolist() == prompt
        assert ours["qformer_input_ids"].tolist() == theirs["qformer_input_ids"].tolist()
        torch.testing.assert_close(ours["pixel_values"], theirs["pixel_values"], rtol=0, atol=0)


def test_labels_are_valid_ids_for_the_model(processor):
    """No label is an id outside the LLM vocabulary (the image token never appears in labels)."""
    decoder_only = processor.tokenizer.bos_token_id is not None
    batch = InstructBlipDataCollator(processor, decoder_only=decoder_only, train_on_prompt=decoder_only)(records())
    labels = batch["labels"][batch["labels"] != X]
    assert labels.numel() > 0
    assert int(labels.max()) < len(processor.tokenizer) and processor.image_token_id not in labels.tolist()
    assert int(labels.max()) < tiny.text_config("llama").vocab_size


def test_dataset_names_pass_through(processor):
    named = [{**r, "dataset": name} for r, name in zip(records(), ["vqa", "caption", "vqa"])]
    collator = InstructBlipDataCollator(processor, decoder_only=processor.tokenizer.bos_token_id is not None)
    assert collator(named)["dataset"] == ["vqa", "caption", "vqa"]
    assert "dataset" not in collator(records())
    with pytest.raises(ValueError, match=r"records \[1\].*'dataset'"):
        collator([named[0], records()[1]])


def test_image_ids_become_a_long_tensor(processor):
    collator = InstructBlipDataCollator(processor, decoder_only=True)
    with_ids = [{**r, "image_id": np.int64(10 + i) if i else 10} for i, r in enumerate(records())]  # numpy ints too
    ids = collator(with_ids)["image_ids"]
    assert ids.dtype == torch.long and ids.tolist() == [10 + i for i in range(len(with_ids))]
    assert "image_ids" not in collator(records())
    with pytest.raises(ValueError, match=r"records \[1\].*'image_id'"):
        collator([with_ids[0], records()[1]])


@pytest.mark.parametrize(
    ("change", "error", "pattern"),
    [
        (lambda r: r.pop("answer"), ValueError, r"record 1: field 'answer' is missing"),
        (lambda r: r.update(image=None), ValueError, r"record 1: field 'image' is None"),
        (lambda r: r.update(instruction=42), TypeError, r"record 1: field 'instruction' must be a str, found int"),
        (lambda r: r.update(answer=["a"]), TypeError, r"record 1: field 'answer' must be a str, found list"),
        (lambda r: r.update(answer="a <image> b"), ValueError, r"record 1: field 'answer' contains the image token"),
        (lambda r: r.update(dataset=3), TypeError, r"record 1: field 'dataset' must be a str"),
        (lambda r: r.update(image_id="a"), TypeError, r"record 1: field 'image_id' must be an int, found str"),
        (lambda r: r.update(image_id=True), TypeError, r"record 1: field 'image_id' must be an int, found bool"),
    ],
)
def test_bad_records_name_index_and_field(change, error, pattern):
    batch = records()
    change(batch[1])
    collator = InstructBlipDataCollator(make_processor("llama"), decoder_only=True)
    with pytest.raises(error, match=pattern):
        collator(batch)


def test_bad_arguments():
    processor = make_processor("t5")
    with pytest.raises(ValueError, match="train_on_prompt"):
        InstructBlipDataCollator(processor, decoder_only=False, train_on_prompt=True)
    with pytest.raises(TypeError, match="decoder_only"):
        InstructBlipDataCollator(processor, decoder_only="yes")
    with pytest.raises(ValueError, match="max_output_length"):
        InstructBlipDataCollator(processor, decoder_only=False, max_output_length=0)
    with pytest.raises(TypeError, match="qformer_tokenizer"):
        InstructBlipDataCollator(types.SimpleNamespace(tokenizer=processor.tokenizer), decoder_only=False)
    with pytest.raises(ValueError, match="empty batch"):
        InstructBlipDataCollator(processor, decoder_only=False)([])
    with pytest.raises(TypeError, match="record 0: expected a mapping"):
        InstructBlipDataCollator(processor, decoder_only=False)(["not a record"])


# --- training layout == inference layout -----------------------------------------------------------------
def gpt2_style_tokenizer():
    """A tokenizer that defines bos but does not add it (GPT-2 / NeoX style)."""
    tokenizer = tiny.llm_tokenizer("llama")
    tokenizer.backend_tokenizer.post_processor = None
    return tokenizer


@pytest.mark.parametrize("kind", ["llama", "t5", "gpt2-style"])
@pytest.mark.parametrize("budget", [None, 6], ids=["whole", "truncated"])
def test_collator_prompt_equals_what_the_processor_writes(kind, budget):
    """A model trained on collator batches is queried with processor outputs: same prompt tokens, same Q-Former
    text, same truncation (the end of a long instruction is kept)."""
    from hf_instructblip import InstructBlipProcessor as OurProcessor

    tokenizer = gpt2_style_tokenizer() if kind == "gpt2-style" else tiny.llm_tokenizer(kind)
    processor = OurProcessor(tiny.image_processor(), tokenizer, tiny.qformer_tokenizer(),
                             num_query_tokens=tiny.NUM_QUERY_TOKENS)
    limits = {} if budget is None else {"max_input_length": budget}
    collator = InstructBlipDataCollator(processor, decoder_only=kind != "t5", **limits)
    instruction = "what is in the picture ? a red circle on a white background ."
    batch = collator([{"image": tiny.images(1)[0], "instruction": instruction, "answer": "a circle"}])
    truncation = {} if budget is None else {"truncation": True, "max_length": tiny.NUM_QUERY_TOKENS + budget}
    inference = processor(images=tiny.images(1), text=[instruction], return_tensors="pt", **truncation)
    prompt = inference["input_ids"][0].tolist()
    trained = batch["input_ids"][0].tolist()
    if kind != "t5":  # decoder-only rows continue with the answer: compare the prompt part
        trained = trained[: len(prompt)]
    assert trained == prompt
    assert batch["qformer_input_ids"][0].tolist() == inference["qformer_input_ids"][0].tolist()
    if budget is not None:
        assert len(prompt) == tiny.NUM_QUERY_TOKENS + budget
        kept = tokenizer.decode(prompt[tiny.NUM_QUERY_TOKENS:], skip_special_tokens=True).strip()
        assert instruction.endswith(kept) and len(kept) < len(instruction)  # the end survived, the start went


@pytest.mark.parametrize("form", ["pil", "uint8-hwc", "float-hwc", "float-chw-tensor"])
def test_pixels_equal_what_the_processor_makes_for_every_image_form(form):
    """Float arrays in [0, 1] were rescaled twice by the collator (not by the processor): train != inference."""
    from hf_instructblip import InstructBlipProcessor as OurProcessor

    processor = OurProcessor(tiny.image_processor(), tiny.llm_tokenizer("t5"), tiny.qformer_tokenizer(),
                             num_query_tokens=tiny.NUM_QUERY_TOKENS)
    pil = tiny.images(1)[0]
    array = np.asarray(pil)  # [H, W, 3] uint8
    image = {"pil": pil, "uint8-hwc": array, "float-hwc": array / 255.0,
             "float-chw-tensor": torch.from_numpy(array / 255.0).permute(2, 0, 1).float()}[form]
    collator = InstructBlipDataCollator(processor, decoder_only=False)
    trained = collator([{"image": image, "instruction": "what is it ?", "answer": "a circle"}])["pixel_values"]
    expected = processor(images=[pil], text=["what is it ?"], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(trained, expected, atol=1e-5, rtol=0)


ONE_TOKEN_WORDS = ["i", "a", "s", "t", "c", "is", "b"]  # each one token of the tiny LLM tokenizer, also in a row


@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_every_prompt_length_keeps_exactly_its_last_tokens_within_the_budget(kind):
    """Left truncation (LAVIS): a prompt of n tokens keeps its last min(n, budget) tokens, for n = 1 .. 2 budget.
    The expected ids come from the tokenizer on the whole prompt, sliced here; the collator never sees them."""
    collator = InstructBlipDataCollator(make_processor(kind), decoder_only=kind != "t5", max_input_length=12)
    budget = 11  # max_input_length minus bos (decoder-only) or the final eos (T5)
    tokenizer, rng = collator.processor.tokenizer, np.random.default_rng(0)
    image = [I] * tiny.NUM_QUERY_TOKENS
    for length in range(1, 2 * budget + 1):
        instruction = " ".join(rng.choice(ONE_TOKEN_WORDS, size=length))
        ids = tokenizer.encode(instruction, add_special_tokens=False)
        assert len(ids) == length
        kept = ids[-min(length, budget):]
        batch = collator([{"image": tiny.images(1)[0], "instruction": instruction, "answer": "yes"}])
        row = batch["input_ids"][0].tolist()
        if kind == "t5":
            assert row == image + kept + [tokenizer.eos_token_id], length
        else:
            answer = tokenizer.encode("yes", add_special_tokens=False) + [tokenizer.eos_token_id]
            assert row == image + [tokenizer.bos_token_id] + kept + answer, length


def test_an_empty_answer_is_refused_naming_the_record():
    collator = InstructBlipDataCollator(make_processor("llama"), decoder_only=True)
    good = {"image": tiny.images(1)[0], "instruction": "is it red ?", "answer": "yes"}
    with pytest.raises(ValueError, match="record 1: field 'answer' is empty"):
        collator([good, {**good, "answer": "  "}])
