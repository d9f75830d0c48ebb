"""The paper's tasks, datasets, split, templates and eval prompts, and the seeded record helper."""

from __future__ import annotations

import pytest

from hf_instructblip import templates as T
from hf_instructblip.templates import make_instruction_record as record

QUESTION, ANSWER = "what is on the table", "a red cup"  # no final punctuation: templates add their own


# ---- the data file ----------------------------------------------------------------------------------------------------
def test_eleven_categories_and_twenty_six_distinct_datasets():
    assert len(T.CATEGORIES) == 11
    assert len(T.DATASETS) == len(set(T.DATASETS)) == 26


def test_held_in_and_held_out_are_disjoint_and_cover_every_dataset():
    assert len(T.HELD_IN) == len(T.HELD_OUT) == 13
    assert not set(T.HELD_IN) & set(T.HELD_OUT)
    assert sorted(T.HELD_IN + T.HELD_OUT) == sorted(T.DATASETS)


def test_every_held_out_dataset_has_an_eval_prompt_with_matching_slots():
    assert set(T.EVAL_PROMPTS) == set(T.HELD_OUT) == set(T.EVAL_PROMPT_SLOTS)
    for dataset, prompt in T.EVAL_PROMPTS.items():
        slots = T.EVAL_PROMPT_SLOTS[dataset]
        assert prompt.count("{}") == len(slots), dataset
        filled = T.eval_prompt(dataset, {field: f"<{field}>" for field in slots})
        assert "{}" not in filled and all(f"<{field}>" in filled for field in slots)


def test_eval_prompt_fills_slots_in_order():
    assert T.eval_prompt("scienceqa", {"context": "It rains.", "question": "Is it wet?", "options": ["yes", "no"]}) \
        == "Context: It rains. Question: Is it wet? Options: yes, no. Answer:"
    assert T.eval_prompt("nocaps") == "A short image description:"
    with pytest.raises(ValueError, match="'question'"):
        T.eval_prompt("gqa", {"answer": "x"})
    with pytest.raises(ValueError, match="held-out dataset"):
        T.eval_prompt("vqav2", {"question": "x"})


def test_every_template_formats_and_each_family_has_several():
    assert set(T.TEMPLATES) == {"image_captioning", "vqa", "vqg"}
    for family, templates in T.TEMPLATES.items():
        assert len(templates) >= 6 and len(set(templates)) == len(templates)
        for template in templates:
            filled = template.format("SLOT")
            assert "{" not in filled and "}" not in filled
            # captioning templates have no slot; question (generation) templates have exactly one
            assert template.count("{}") == (0 if family == "image_captioning" else 1), template


@pytest.mark.parametrize(
    ("task", "family"),
    [("coco_caption", "image_captioning"), ("web_capfilt", "image_captioning"), ("textcaps", "image_captioning"),
     ("vqav2", "vqa"), ("okvqa", "vqa"), ("aokvqa", "vqa"), ("ocrvqa", "vqa"), ("vqav2_qg", "vqg"),
     ("okvqa_qg", "vqg"), ("aokvqa_qg", "vqg"), ("llava_conversation", "instruction"),
     ("llava_detailed_description", "instruction"), ("knowledge_grounded_image_question_answering", "vqa"),
     ("vqa", "vqa"), ("image_captioning", "image_captioning")],
)
def test_template_family_of_datasets_categories_and_families(task, family):
    assert T.template_family(task) == family
    assert T.templates_for(task) == T.TEMPLATES.get(family, ())


def test_every_held_in_dataset_has_a_category():
    for dataset in T.HELD_IN:
        assert dataset in T.CATEGORIES[T.category_of(dataset)]


# ---- records ---------------------------------------------------------------------------------------------------------
def test_vqa_record_uses_a_vqa_template_with_the_question():
    out = record({"image": "img.png", "question": QUESTION, "answer": ANSWER}, "vqav2", seed=0, index=3)
    assert tuple(out) == T.RECORD_KEYS == ("image", "instruction", "answer", "dataset")
    assert out["instruction"] in {t.format(QUESTION) for t in T.TEMPLATES["vqa"]}
    assert (out["image"], out["answer"], out["dataset"]) == ("img.png", ANSWER, "vqav2")


def test_caption_record_answers_with_the_caption():
    out = record({"image": 0, "caption": "two dogs on grass"}, "coco_caption", index=1)
    assert out["instruction"] in T.TEMPLATES["image_captioning"]
    assert out["answer"] == "two dogs on grass"


def test_question_generation_record_swaps_question_and_answer():
    out = record({"image": 0, "question": QUESTION, "answer": ANSWER}, "okvqa_qg", index=2)
    assert out["instruction"] in {t.format(ANSWER) for t in T.TEMPLATES["vqg"]}
    assert out["answer"] == QUESTION


def test_llava_record_keeps_the_instruction_verbatim():
    example = {"image": 0, "question": "Describe the scene in detail.", "answer": "A kitchen with ..."}
    out = record(example, "llava_detailed_description", index=9)
    assert (out["instruction"], out["answer"]) == (example["question"], example["answer"])


def test_ocr_context_and_options_are_placed_around_the_question():
    example = {"image": 0, "question": QUESTION, "answer": ANSWER, "ocr_tokens": ["cafe", "open"],
               "context": "A photo from a shop.", "options": ["a red cup", "a blue plate"]}
    out = record(example, "vqa", index=0)
    slot = f"{QUESTION} Options: a red cup, a blue plate."
    prefix = "Context: A photo from a shop. OCR tokens: cafe, open. "
    assert out["instruction"] in {prefix + t.replace("{}.", "{}").format(slot) for t in T.TEMPLATES["vqa"]}
    caption = record({"image": 0, "caption": "a sign", "ocr_tokens": "stop"}, "textcaps", index=0)
    assert caption["instruction"].startswith("OCR tokens: stop. ")


def test_no_doubled_full_stop_after_a_question_mark():
    for index in range(40):
        out = record({"image": 0, "question": "What is it?", "answer": "x"}, "vqa", index=index)
        assert "?." not in out["instruction"]


def test_template_choice_is_seeded_and_covers_every_template():
    example = {"image": 0, "question": QUESTION, "answer": ANSWER}
    assert record(example, "vqa", seed=3, index=5) == record(example, "vqa", seed=3, index=5)
    seen = {record(example, "vqa", seed=3, index=i)["instruction"] for i in range(300)}
    assert seen == {t.format(QUESTION) for t in T.TEMPLATES["vqa"]}
    other_seed = [record(example, "vqa", seed=4, index=i)["instruction"] for i in range(50)]
    assert other_seed != [record(example, "vqa", seed=3, index=i)["instruction"] for i in range(50)]


def test_a_list_of_answers_gives_one_of_them():
    example = {"image": 0, "question": QUESTION, "answer": ["two", "two", "2"]}
    answers = {record(example, "vqav2", index=i)["answer"] for i in range(100)}
    assert answers == {"two", "2"}


@pytest.mark.parametrize(
    ("example", "task", "error", "match"),
    [
        ({"image": 0, "question": "q", "answer": "a"}, "not_a_task", ValueError, "not_a_task"),
        ({"image": 0, "question": "q"}, "vqav2", ValueError, "'answer'"),
        ({"image": 0, "answer": "a"}, "coco_caption", ValueError, "'caption'"),
        ({"question": "q", "answer": "a"}, "vqav2", ValueError, "'image'"),
        ({"image": 0, "question": 3, "answer": "a"}, "vqav2", TypeError, "question"),
        ({"image": 0, "caption": "c", "options": ["x"]}, "coco_caption", ValueError, "options"),
        (["image", "q"], "vqav2", TypeError, "example"),
    ],
)
def test_bad_examples_raise_clear_errors(example, task, error, match):
    with pytest.raises(error, match=match):
        record(example, task)
