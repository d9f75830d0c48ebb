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


# The paper's zero-shot prompts (shared/reference/instruction_data.json, "eval_prompts") filled by hand from FULL and
# from the fewest fields each dataset takes, written out so a wrong prompt table cannot pass by changing code alike.
FULL = {"question": "What is it?", "ocr_tokens": ["stop", "ahead"], "options": ["a", "b"], "context": "A sign.",
        "caption": "The cat is left of the dog."}
PAPER_PROMPTS = {
    "flickr30k": "A short image description:",
    "gqa": "Question: What is it? Short answer:",
    "hateful_memes": 'This is an image with: "stop, ahead" written on it. Is it hateful? Answer:',
    "iconqa": "Question: What is it? Options: a, b. Short answer:",
    "ivqa": "Question: What is it? Short answer:",
    "msrvtt_qa": "Question: What is it? Short answer:",
    "msvd_qa": "Question: What is it? Short answer:",
    "nocaps": "A short image description:",
    "scienceqa": "Context: A sign. Question: What is it? Options: a, b. Answer:",
    "textvqa": "OCR tokens: stop, ahead. Question: What is it? Short answer:",
    "visdial": "Dialog history: A sign.\n Question: What is it? Short answer:",
    "vizwiz": "Question: What is it? Short answer:",
    "vsr": 'Based on the image, is this statement true or false? "The cat is left of the dog." Answer:',
}
# The evaluation data's aliases: "text" for the question, the meme text or the VSR statement; "candidates".
ALIASED = [
    ("gqa", {"text": "Why?"}, "Question: Why? Short answer:"),
    ("msvd_qa", {"text": "Who runs?"}, "Question: Who runs? Short answer:"),
    ("iconqa", {"question": "Q?", "candidates": ["x", "y"]}, "Question: Q? Options: x, y. Short answer:"),
    ("hateful_memes", {"text": "love everyone"},
     'This is an image with: "love everyone" written on it. Is it hateful? Answer:'),
    ("vsr", {"text": "The cup is on the table."},
     'Based on the image, is this statement true or false? "The cup is on the table." Answer:'),
    ("textvqa", {"ocr_tokens": "exit", "question": "Q?"}, "OCR tokens: exit. Question: Q? Short answer:"),
    ("visdial", {"context": "A dog.", "text": "Is it big?"},
     "Dialog history: A dog.\n Question: Is it big? Short answer:"),
    # ScienceQA without a context (many questions): no "Context:" part and no double space.
    ("scienceqa", {"question": "Q?", "options": ["x", "y"]}, "Question: Q? Options: x, y. Answer:"),
    ("scienceqa", {"question": "Q?", "options": ["x"], "context": ""}, "Question: Q? Options: x. Answer:"),
    ("scienceqa", {"question": "Q?", "options": ["x"], "context": None}, "Question: Q? Options: x. Answer:"),
]


def test_every_held_out_dataset_has_a_written_out_prompt():
    assert set(T.EVAL_PROMPTS) == set(T.HELD_OUT) == set(PAPER_PROMPTS)


@pytest.mark.parametrize("dataset", sorted(PAPER_PROMPTS))
def test_eval_prompt_is_the_papers(dataset):
    assert T.eval_prompt(dataset, FULL) == PAPER_PROMPTS[dataset]


@pytest.mark.parametrize(("dataset", "example", "prompt"), ALIASED)
def test_eval_prompt_takes_the_data_aliases_and_an_optional_context(dataset, example, prompt):
    assert T.eval_prompt(dataset, example) == prompt


def test_eval_prompt_without_slots_needs_no_example():
    assert T.eval_prompt("nocaps") == T.eval_prompt("flickr30k", {}) == "A short image description:"


@pytest.mark.parametrize(
    ("dataset", "example", "error", "match"),
    [
        ("gqa", {"answer": "x"}, ValueError, r"'gqa' prompt is missing the field\(s\) 'question' \(or 'text'\); "
                                             r"got fields \['answer'\]"),
        ("scienceqa", {"context": "c", "question": "q"}, ValueError,
         r"'scienceqa' prompt is missing the field\(s\) 'options' \(or 'candidates'\); "
         r"got fields \['context', 'question'\]"),
        ("visdial", {"question": "q"}, ValueError, r"'visdial' prompt is missing the field\(s\) 'context';"),
        ("vqav2", {"question": "x"}, ValueError, "held-out dataset"),
        ("gqa", {"question": 3}, TypeError, r"example\['question'\]: expected a str or a list of str, got int"),
        ("gqa", ["question"], TypeError, "example: expected a dict, got list"),
    ],
)
def test_eval_prompt_errors_name_dataset_and_fields(dataset, example, error, match):
    with pytest.raises(error, match=match):
        T.eval_prompt(dataset, example)


def test_held_out_metrics_and_ranked_datasets_come_from_the_data_file():
    assert set(T.HELD_OUT_METRICS) == set(T.HELD_OUT)
    assert T.RANKING_DATASETS & set(T.HELD_OUT) == {"iconqa", "scienceqa", "msvd_qa", "msrvtt_qa", "visdial",
                                                     "hateful_memes"}


def test_generation_presets_are_lavis_defaults():
    assert T.generation_preset("lavis") == dict(num_beams=5, max_new_tokens=256, min_new_tokens=1,
                                                repetition_penalty=1.5, length_penalty=1.0, do_sample=False)
    assert T.generation_preset("short") == dict(num_beams=5, max_new_tokens=10, min_new_tokens=1,
                                                length_penalty=-1.0, do_sample=False)
    assert T.generation_preset("short", sample=True) == {**T.generation_preset("short"), "do_sample": True,
                                                         "top_p": 0.9}
    with pytest.raises(ValueError, match=r"`preset` must be one of \['lavis', 'short'\], found 'long'"):
        T.generation_preset("long")


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
    assert tuple(out) == ("image", "instruction", "answer", "dataset")
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
