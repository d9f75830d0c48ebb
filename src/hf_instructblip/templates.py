"""The paper's instruction-tuning data: 11 task categories, 26 datasets, held-in/held-out split, templates.

Loaded from `instruction_data.json` (shipped in the package; the paper's appendix as reproduced publicly).
`make_instruction_record` turns a raw example into the record the collator consumes, with a template of its
task drawn by a seed; `eval_prompt` fills a held-out dataset's zero-shot evaluation prompt.

Template families: captioning datasets use "image_captioning" templates (no slot; the caption is the answer),
question answering uses "vqa" (slot = the question), question generation uses "vqg" (slot = the answer; the
question is the target), and LLaVA-Instruct-150K is already an instruction ("instruction": used verbatim).
"""

from __future__ import annotations

import json
import random
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
EVAL_PROMPTS: Mapping[str, str] = MappingProxyType(dict(_DATA["eval_prompts"]))

INSTRUCTION_FAMILY = "instruction"  # LLaVA-Instruct-150K: the question already is the instruction
FAMILIES: tuple[str, ...] = (*TEMPLATES, INSTRUCTION_FAMILY)

# Which template family each category uses; every other category answers questions ("vqa").
_FAMILY_OF_CATEGORY = {
    "image_captioning": "image_captioning",
    "image_captioning_reading_comprehension": "image_captioning",
    "image_question_generation": "vqg",
    "llava_instruct_150k": INSTRUCTION_FAMILY,
}

# The example fields that fill each evaluation prompt's "{}" slots, in order (our reading of the prompts).
EVAL_PROMPT_SLOTS: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "nocaps": (), "flickr30k": (),
    "gqa": ("question",), "vizwiz": ("question",), "ivqa": ("question",),
    "msvd_qa": ("question",), "msrvtt_qa": ("question",),
    "textvqa": ("ocr_tokens", "question"),
    "iconqa": ("question", "options"),
    "scienceqa": ("context", "question", "options"),
    "vsr": ("caption",),                 # the spatial statement to judge true or false
    "visdial": ("context", "question"),  # context = the dialog history
    "hateful_memes": ("ocr_tokens",),    # the text written on the meme
})

RECORD_KEYS = ("image", "instruction", "answer", "dataset")


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
    category = task if task in CATEGORIES else None
    if category is None and task in DATASETS:
        category = category_of(task)
    if category is None:
        raise ValueError(
            f"task: expected a template family {list(FAMILIES)}, a category {list(CATEGORIES)} "
            f"or a dataset {list(DATASETS)}, got {task!r}"
        )
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
        raise ValueError(
            f"example: a {family!r} task needs a non-empty {field!r} field; got fields {sorted(example)}"
        )
    return value


def _fill(template: str, slot: str) -> str:
    """`template` with its "{}" slot filled; no doubled full stop when the slot ends a sentence itself."""
    if slot.endswith((".", "?", "!")):
        template = template.replace("{}.", "{}")
    return template.format(slot)


def make_instruction_record(
    example: Mapping[str, Any], task: str, *, seed: int = 0, index: int = 0, dataset: str | None = None
) -> dict[str, Any]:
    """Turn a raw example into ``{"image", "instruction", "answer", "dataset"}`` for the collator.

    `example` holds "image" and, by family: "caption" (captioning) or "question" and "answer" (the others);
    optional "ocr_tokens" and "context" become prefixes ("OCR tokens: ...", "Context: ..."), "options"
    (question answering only) follow the question. A list of answers or captions gives one, drawn.
    The template (and drawn answer) depend only on (seed, dataset, index): reproducible under any
    DataLoader order or worker count.

    Example:
        >>> record = make_instruction_record({"image": "cat.jpg", "question": "What is it?", "answer": "a cat"},
        ...                                  "vqav2", seed=0, index=7)
        >>> sorted(record), record["answer"]
        (['answer', 'dataset', 'image', 'instruction'], 'a cat')
    """
    if not isinstance(example, Mapping):
        raise TypeError(f"example: expected a dict, got {type(example).__name__}")
    if "image" not in example:
        raise ValueError(f"example: expected an 'image' field, got fields {sorted(example)}")
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
    body = slot if family == INSTRUCTION_FAMILY else _fill(rng.choice(TEMPLATES[family]), slot)

    prefixes = []
    if (context := _text(example, "context")) is not None:
        prefixes.append(f"Context: {context}")
    if (ocr := _text(example, "ocr_tokens")) is not None:
        prefixes.append(f"OCR tokens: {ocr}.")
    return {"image": example["image"], "instruction": " ".join([*prefixes, body]), "answer": answer,
            "dataset": dataset}


def eval_prompt(dataset: str, example: Mapping[str, Any] | None = None) -> str:
    """The zero-shot evaluation prompt of a held-out dataset, its slots filled from `example`.

    >>> eval_prompt("textvqa", {"ocr_tokens": ["stop", "ahead"], "question": "What does the sign say?"})
    'OCR tokens: stop, ahead. Question: What does the sign say? Short answer:'
    """
    if dataset not in EVAL_PROMPTS:
        raise ValueError(f"dataset: expected a held-out dataset {list(EVAL_PROMPTS)}, got {dataset!r}")
    example = {} if example is None else example
    if not isinstance(example, Mapping):
        raise TypeError(f"example: expected a dict, got {type(example).__name__}")
    slots = EVAL_PROMPT_SLOTS[dataset]
    values = [_required(example, field, dataset) for field in slots]
    return EVAL_PROMPTS[dataset].format(*values)


__all__ = [
    "CATEGORIES", "DATASETS", "EVAL_PROMPTS", "EVAL_PROMPT_SLOTS", "FAMILIES", "HELD_IN", "HELD_OUT",
    "INSTRUCTION_FAMILY", "RECORD_KEYS", "TEMPLATES", "category_of", "eval_prompt", "make_instruction_record",
    "template_family", "templates_for",
]
