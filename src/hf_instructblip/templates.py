"""The paper's instruction-tuning data: 11 task categories, 26 datasets, held-in/held-out split, templates.

Loaded from `instruction_data.json` (the paper's appendix as reproduced publicly); this module is its only reader.

Template families: captioning datasets use "image_captioning" templates (no slot; the caption is the answer),
question answering uses "vqa" (slot = the question), question generation uses "vqg" (slot = the answer; the
question is the target), and LLaVA-Instruct-150K is already an instruction ("instruction": used verbatim).
"""

from __future__ import annotations

import json
import random
import re
import string
from collections.abc import Mapping
from importlib import resources
from types import MappingProxyType
from typing import Any

_DATA: dict[str, Any] = json.loads(resources.files(__package__).joinpath("instruction_data.json").read_text("utf-8"))

CATEGORIES: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {category: tuple(names) for category, names in _DATA["categories"].items()}
)
DATASETS: tuple[str, ...] = tuple(name for names in CATEGORIES.values() for name in names)
HELD_IN: tuple[str, ...] = tuple(_DATA["held_in"])
HELD_OUT: tuple[str, ...] = tuple(_DATA["held_out"])
TEMPLATES: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {family: tuple(templates) for family, templates in _DATA["templates"].items()}
)
# Held-out dataset -> its zero-shot prompt: "{field}" slots, "[...]" parts left out when their field is missing.
EVAL_PROMPTS: Mapping[str, str] = MappingProxyType(dict(_DATA["eval_prompts"]))
# Held-out dataset -> the name of its metric in `hf_instructblip.evaluate` ("vqa_accuracy", "cider", "mrr", ...).
HELD_OUT_METRICS: Mapping[str, str] = MappingProxyType(dict(_DATA["held_out_metrics"]))
# Datasets scored by ranking a fixed candidate set by log-likelihood instead of free generation.
RANKING_DATASETS: frozenset[str] = frozenset(_DATA["candidate_ranking_datasets"])
GENERATION_PRESETS: tuple[str, ...] = tuple(_DATA["generation_presets"])

INSTRUCTION_FAMILY = "instruction"  # LLaVA-Instruct-150K: the question already is the instruction
FAMILIES: tuple[str, ...] = (*TEMPLATES, INSTRUCTION_FAMILY)

# Which template family each category uses; every other category answers questions ("vqa").
_FAMILY_OF_CATEGORY = {
    "image_captioning": "image_captioning",
    "image_captioning_reading_comprehension": "image_captioning",
    "image_question_generation": "vqg",
    "llava_instruct_150k": INSTRUCTION_FAMILY,
}

# Evaluation data fields that fill a prompt slot, first non-empty wins ("text" is the question or a meme's text).
_SLOT_FIELDS = {"question": ("question", "text"), "ocr_tokens": ("ocr_tokens", "text"),
                "options": ("options", "candidates"), "caption": ("caption", "text")}
_OPTIONAL_PART = re.compile(r"\[([^\[\]]*)\]")


def category_of(dataset: str) -> str:
    """The task category of one of the paper's 26 datasets."""
    for category, names in CATEGORIES.items():
        if dataset in names:
            return category
    raise ValueError(f"dataset: expected one of the paper's datasets {list(DATASETS)}, got {dataset!r}")


def template_family(task: str) -> str:
    """Template family of a task given as a family, a category or a dataset name.

    >>> template_family("okvqa_qg"), template_family("textcaps"), template_family("vqa")
    ('vqg', 'image_captioning', 'vqa')
    """
    if not isinstance(task, str):
        raise TypeError(f"task: expected a str, got {type(task).__name__}")
    if task in FAMILIES:
        return task
    category = category_of(task) if task in DATASETS else task
    if category not in CATEGORIES:
        raise ValueError(f"task: expected a template family {list(FAMILIES)}, a category {list(CATEGORIES)} "
                         f"or a dataset {list(DATASETS)}, got {task!r}")
    return _FAMILY_OF_CATEGORY.get(category, "vqa")


def templates_for(task: str) -> tuple[str, ...]:
    """The instruction templates of a task ("{}" marks the slot); empty for verbatim instructions."""
    return TEMPLATES.get(template_family(task), ())


def _text(example: Mapping[str, Any], field: str, rng: random.Random | None = None) -> str | None:
    """A text field: a str as is; a list joined by ", " or, with `rng`, one element drawn (answers)."""
    value = example.get(field)
    if value is None or (isinstance(value, (list, tuple)) and not value) or value == "":
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return rng.choice(list(value)) if rng is not None else ", ".join(value)
    raise TypeError(f"example[{field!r}]: expected a str or a list of str, got {type(value).__name__} {value!r}")


def _required(example: Mapping[str, Any], field: str, family: str, rng: random.Random | None = None) -> str:
    value = _text(example, field, rng)
    if value is None:
        raise ValueError(f"example: a {family!r} task needs a non-empty {field!r} field; got fields {sorted(example)}")
    return value


def _fill(template: str, slot: str) -> str:
    """`template` with its "{}" slot filled; no doubled full stop when the slot ends a sentence itself."""
    if slot.endswith((".", "?", "!")):
        template = template.replace("{}.", "{}")
    return template.format(slot)


def visual_field(record: Mapping[str, Any]) -> str:
    """"video" for a video record (a clip, no image), else "image": the one rule for training and evaluation.

    Example:
        >>> visual_field({"video": ["f0.jpg", "f1.jpg"], "question": "What happens?"})
        'video'
    """
    return "video" if "video" in record and record.get("image") is None else "image"


# How a training record's instruction is written: the paper's templates, or its Table 4 multitask baselines: the
# raw input alone ("none": the question, nothing for a caption) or prefixed by "[task:dataset]" ("dataset_name").
INSTRUCTION_STYLES = ("templates", "none", "dataset_name")


def make_instruction_record(
    example: Mapping[str, Any], task: str, *, seed: int = 0, index: int = 0, dataset: str | None = None,
    instructions: str = "templates",
) -> dict[str, Any]:
    """Turn a raw example into ``{"image", "instruction", "answer", "dataset"}`` for the collator.

    `example` holds "image" and "caption" (captioning) or "question" and "answer"; optional "ocr_tokens" and
    "context" become prefixes, "options" (question answering only) follow the question. A list of answers or
    captions gives one, drawn. A "video" (a clip) may replace "image"; it is kept as given. Template and draw
    depend only on (seed, dataset, index): reproducible under any DataLoader order or worker count.
    `instructions` (`INSTRUCTION_STYLES`): "templates", or the paper's multitask ablations (Table 4): "none" (the
    raw input: question, options and prefixes, no template) or "dataset_name" (the raw input after
    "[category:dataset]").

    Example:
        >>> record = make_instruction_record({"image": "cat.jpg", "question": "What is it?", "answer": "a cat"},
        ...                                  "vqav2", seed=0, index=7)
        >>> sorted(record), record["answer"]
        (['answer', 'dataset', 'image', 'instruction'], 'a cat')
    """
    if not isinstance(example, Mapping):
        raise TypeError(f"example: expected a dict, got {type(example).__name__}")
    visual = visual_field(example)  # a clip's task picks its templates
    if visual not in example:
        raise ValueError(f"example: expected an 'image' (or 'video') field, got fields {sorted(example)}")
    family = template_family(task)
    dataset = task if dataset is None else dataset
    # str seeds are hashed with SHA-512 by `random`: stable across processes, unlike hash().
    rng = random.Random(f"{seed}/{dataset}/{index}")

    if family == "image_captioning":
        slot, answer = "", _required(example, "caption", family, rng)
    elif family == "vqg":
        slot, answer = _required(example, "answer", family, rng), _required(example, "question", family)
    else:  # "vqa" or verbatim "instruction"
        slot, answer = _required(example, "question", family), _required(example, "answer", family, rng)

    options = _text(example, "options")
    if options is not None:
        if family != "vqa":
            raise ValueError(f"example['options']: only question-answering tasks take options, not {family!r}")
        slot = f"{slot} Options: {options}."
    if instructions not in INSTRUCTION_STYLES:
        raise ValueError(f"instructions: expected one of {list(INSTRUCTION_STYLES)}, got {instructions!r}")
    template = rng.choice(TEMPLATES[family]) if family != INSTRUCTION_FAMILY else "{}"  # drawn in every style
    body = _fill(template, slot) if instructions == "templates" else slot.strip()
    if instructions == "dataset_name":
        body = f"[{category_of(dataset) if dataset in DATASETS else family}:{dataset}] {body}".strip()

    prefixes = []
    if (context := _text(example, "context")) is not None:
        prefixes.append(f"Context: {context}")
    if (ocr := _text(example, "ocr_tokens")) is not None:
        prefixes.append(f"OCR tokens: {ocr}.")
    return {visual: example[visual], "instruction": " ".join([*prefixes, body]), "answer": answer,
            "dataset": dataset}


def _slot_names(prompt: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(prompt) if name]


def _alternatives(name: str) -> str:
    """"'question' (or 'text')": a slot's field and its aliases, for error messages."""
    first, *others = _SLOT_FIELDS.get(name, (name,))
    return repr(first) + (f" (or {', '.join(map(repr, others))})" if others else "")


def eval_prompt(dataset: str, example: Mapping[str, Any] | None = None) -> str:
    """The zero-shot evaluation prompt of a held-out dataset, its slots filled from `example`.

    Slots take the first non-empty of their fields (`_SLOT_FIELDS`); a list is joined by ", ". ScienceQA's
    "Context:" part is left out without a context.

    >>> eval_prompt("scienceqa", {"question": "Which is a mammal?", "options": ["cat", "frog"]})
    'Question: Which is a mammal? Options: cat, frog. Answer:'
    """
    if dataset not in EVAL_PROMPTS:
        raise ValueError(f"dataset: expected a held-out dataset {list(EVAL_PROMPTS)}, got {dataset!r}")
    example = {} if example is None else example
    if not isinstance(example, Mapping):
        raise TypeError(f"example: expected a dict, got {type(example).__name__}")
    prompt = EVAL_PROMPTS[dataset]
    values = {}
    for name in _slot_names(prompt):  # "[" and "]" are plain text to the parser
        texts = (_text(example, field) for field in _SLOT_FIELDS.get(name, (name,)))
        values[name] = next((text for text in texts if text is not None), None)
    # An optional part goes, brackets and all, when a field in it is missing (no empty "Context:", no double space).
    prompt = _OPTIONAL_PART.sub(lambda m: m[1] if all(values[n] is not None for n in _slot_names(m[1])) else "", prompt)
    missing = [_alternatives(name) for name in _slot_names(prompt) if values[name] is None]
    if missing:
        raise ValueError(f"example: the {dataset!r} prompt is missing the field(s) {', '.join(missing)}; "
                         f"got fields {sorted(example)}")
    return prompt.format(**values)


def generation_preset(preset: str, *, sample: bool = False) -> dict[str, Any]:
    """LAVIS's `generate` defaults as transformers `generate` keywords: "lavis" (captions, long answers) or "short"
    (the short-answer VQA preset). Beam search unless `sample`, which adds LAVIS's nucleus sampling (top_p).

    >>> generation_preset("short")
    {'num_beams': 5, 'max_new_tokens': 10, 'min_new_tokens': 1, 'length_penalty': -1.0, 'do_sample': False}
    """
    if preset not in GENERATION_PRESETS:
        raise ValueError(f"`preset` must be one of {list(GENERATION_PRESETS)}, found {preset!r}.")
    nucleus = _DATA["nucleus_sampling"] if sample else {}
    return {**_DATA["generation_presets"][preset], "do_sample": sample, **nucleus}

