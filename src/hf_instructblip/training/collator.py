"""Instruction-tuning batches: raw `{image, instruction, answer}` records -> model inputs with `labels`, in LAVIS's
training layout (`model.layout` places it; LAVIS never released this code for InstructBLIP, these are its
`blip2_*_instruct` semantics), built from token ids, never by re-splitting rendered strings.

The rules decided here: the prompt is left-truncated (the end of an instruction holds the question), the answer
right-truncated with its eos kept; the Q-Former reads the instruction with its tokenizer's specials, left-truncated to
`qformer_max_length`; video records carry `video` (a clip) instead of `image`, laid out alike with T x Q placeholders
and `pixel_values` `[B, T, 3, H, W]`.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..model.layout import IGNORE_INDEX, generation_prompts, pad_right, tokenizer_adds_bos, training_sequences
from ..model.validation import check_int
from ..templates import visual_field

def _check_records(records: Sequence[Any], answer_required: bool = True) -> None:
    """Validate the required fields of every record (`answer` may be absent when not `answer_required`)."""
    if len(records) == 0:
        raise ValueError("The collator received an empty batch (0 records).")
    for index, record in enumerate(records):
        if not isinstance(record, Mapping):
            raise TypeError(f"record {index}: expected a mapping with 'image', 'instruction', 'answer', "
                            f"found {type(record).__name__}.")
        visual = visual_field(record)
        required = (visual, "instruction", "answer") if answer_required else (visual, "instruction")
        for field in required:
            if field not in record:
                raise ValueError(f"record {index}: field '{field}' is missing (keys found: {sorted(record)}).")
        if record[visual] is None:
            raise ValueError(f"record {index}: field '{visual}' is None; expected "
                             f"{'an image' if visual == 'image' else 'a clip (a list of frames)'}.")
        for field in ("instruction", "answer"):
            if field in required and not isinstance(record[field], str):
                raise TypeError(f"record {index}: field '{field}' must be a str, "
                                f"found {type(record[field]).__name__}.")
        if isinstance(record.get("answer"), str) and not record["answer"].strip():
            raise ValueError(f"record {index}: field 'answer' is empty; there is nothing to learn but the end of "
                             "the sequence. Drop the record or give it an answer.")


def _optional_field(records: Sequence[Mapping], field: str, kind: type, kind_name: str) -> list | None:
    """The values of an optional field that every record carries (or none does), checked to be `kind`."""
    present = [record.get(field) is not None for record in records]
    for index, record in enumerate(records):
        value = record.get(field)
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
            raise TypeError(f"record {index}: field '{field}' must be {kind_name}, found {type(value).__name__}.")
    if not any(present):
        return None
    if not all(present):
        missing = [i for i, has in enumerate(present) if not has]
        raise ValueError(f"records {missing}: field '{field}' is missing while other records in the batch carry one; "
                         f"give every record a {field}, or none.")
    return [record[field] for record in records]


@dataclass
class InstructBlipDataCollator:
    """Collate `{image, instruction, answer[, dataset][, image_id]}` records into InstructBLIP training inputs.

    Args:
        processor: an `InstructBlipProcessor` (its tokenizers, image preprocessing and placeholder layout).
        decoder_only: layout for a decoder-only LLM (True) or an encoder-decoder one (False); pass
            `model.config.use_decoder_only_language_model`.
        max_input_length: prompt tokens kept (counting bos / eos the layout adds), cut from the left.
        max_output_length: answer tokens kept counting the final eos, cut from the right.
        qformer_max_length: Q-Former instruction tokens kept (counting its specials), cut from the left.
        train_on_prompt: also learn the prompt tokens (decoder-only LLMs only).
        add_bos: prepend bos to the decoder-only prompt; None -> when the tokenizer adds one itself, so training
            sees the prompt exactly as the processor writes it at inference.
        prompt_only: evaluation with `generate`: `input_ids` hold the prompt as the processor writes it for
            generation (`layout.generation_prompts`), `labels` the reference `[answer][eos]` `[B, L_answer]` (-100
            padded; absent when no record has an answer) and, decoder-only, `loss_inputs` the training layout of the
            same records (the evaluation loss). `InstructBlipTrainer` derives it with `predict_with_generate`.

    Returns the model's tensors with `labels`, plus `dataset` names and `image_ids` `[B]` when the records carry
    them (`InstructBlipTrainer` logs per-dataset losses and looks the ids up in its vision feature cache).

    Example:
        >>> collator = InstructBlipDataCollator(processor, decoder_only=model.config.use_decoder_only_language_model)
        >>> batch = collator([{"image": image, "instruction": "What is shown?", "answer": "a dog"}])
        >>> model(**batch).loss
        >>> prompts = InstructBlipDataCollator(processor, decoder_only=True, prompt_only=True)(records)
        >>> answers = model.generate(**{k: v for k, v in prompts.items() if k not in ("labels", "loss_inputs")},
        ...                          max_new_tokens=10)
    """

    processor: Any
    decoder_only: bool
    max_input_length: int = 128
    max_output_length: int = 256
    qformer_max_length: int = 128
    train_on_prompt: bool = False
    add_bos: bool | None = None
    prompt_only: bool = False

    def __post_init__(self) -> None:
        for name in ("tokenizer", "qformer_tokenizer", "num_query_tokens", "image_token_id", "qformer_text",
                     "preprocess_images"):
            if getattr(self.processor, name, None) is None:
                raise TypeError(f"`processor` must provide `{name}` (an InstructBlipProcessor does); "
                                f"found {type(self.processor).__name__} without it.")
        for name in ("decoder_only", "prompt_only"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"`{name}` must be a bool, found {type(getattr(self, name)).__name__}.")
        for name in ("max_input_length", "max_output_length", "qformer_max_length"):
            check_int(name, getattr(self, name))
        if self.train_on_prompt and not self.decoder_only:
            raise ValueError("`train_on_prompt=True` needs a decoder-only LLM: an encoder-decoder LLM reads the "
                             "prompt in its encoder, where there is nothing to predict.")
        if self.train_on_prompt and self.prompt_only:
            raise ValueError("`train_on_prompt=True` and `prompt_only=True` exclude each other: a prompt-only batch "
                             "labels the answer alone (the reference for generation metrics).")
        tokenizer = self.processor.tokenizer
        for name in ("eos_token_id", "pad_token_id"):
            if getattr(tokenizer, name) is None:
                raise ValueError(f"The LLM tokenizer has no {name.removesuffix('_id')} token; set one "
                                 f"(e.g. `tokenizer.pad_token = tokenizer.unk_token`) before collating.")
        if self.processor.qformer_tokenizer.pad_token_id is None:
            raise ValueError("The Q-Former tokenizer has no pad token; set one before collating.")
        if self.qformer_max_length <= self.processor.qformer_tokenizer.num_special_tokens_to_add(pair=False):
            raise ValueError(f"`qformer_max_length` ({self.qformer_max_length}) leaves no room for text after "
                             "the Q-Former tokenizer's special tokens.")
        # decided once: encoding a probe string per record showed up at ~11% of collate time
        self._use_bos = tokenizer_adds_bos(tokenizer) if self.add_bos is None else self.add_bos

    # --- token pieces -------------------------------------------------------------------------------------
    def _encode(self, text: str, index: int, field: str) -> list[int]:
        """LLM ids of `text` without special tokens; the image placeholder may not appear in text."""
        ids = self.processor.tokenizer.encode(text, add_special_tokens=False)
        if self.processor.image_token_id in ids:
            token = getattr(self.processor, "image_token", self.processor.image_token_id)
            raise ValueError(f"record {index}: field '{field}' contains the image token {token!r}; the collator "
                             "places the image itself, remove the token from the text.")
        return ids

    def _prompt_ids(self, instruction: str, index: int) -> tuple[list[int], list[int]]:
        """`(prompt ids, their labels)`: decoder-only `[bos] prompt`, encoder-decoder `prompt [eos]`, the prompt
        left-truncated to fit `max_input_length`; labels -100 except the prompt text with `train_on_prompt`."""
        tokenizer = self.processor.tokenizer
        if self.decoder_only:
            specials = [tokenizer.bos_token_id] if self._use_bos else []
        else:
            specials = [tokenizer.eos_token_id]  # T5 encoder input ends with eos (appended after the prompt)
        budget = max(self.max_input_length - len(specials), 0)
        ids = self._encode(instruction, index, "instruction")
        ids = ids[max(len(ids) - budget, 0):] if budget else []  # the last `budget` tokens
        labels = [IGNORE_INDEX] * len(specials) + (ids if self.train_on_prompt else [IGNORE_INDEX] * len(ids))
        if self.decoder_only:
            return specials + ids, labels
        return ids + specials, labels

    def _answer_ids(self, answer: str, index: int) -> list[int]:
        """Answer ids right-truncated to `max_output_length - 1`, then eos (always kept)."""
        ids = self._encode(answer, index, "answer")[: self.max_output_length - 1]
        return ids + [self.processor.tokenizer.eos_token_id]

    def check_model(self, config: Any, name: str = "data_collator") -> None:
        """Raise if this collator (passed to a trainer as `name`) was built for another LLM kind or image token than
        the model whose config is `config`: caught before the first step does."""
        decoder_only = config.use_decoder_only_language_model
        if self.decoder_only != decoder_only:
            kind = "decoder-only" if decoder_only else "encoder-decoder"
            raise ValueError(f"`{name}` was built with decoder_only={self.decoder_only}, but the model's LLM is "
                             f"{kind}; pass decoder_only=model.config.use_decoder_only_language_model.")
        if self.processor.image_token_id != config.image_token_index:
            raise ValueError(f"`{name}` places image token id {self.processor.image_token_id}, but "
                             f"model.config.image_token_index is {config.image_token_index}; they must match.")

    def _text(self, records: Sequence[Mapping], tokens: int) -> dict[str, Any]:
        """The LLM side of the batch through the layout module: training sequences, or, prompt-only, generation
        prompts with the reference answers as `labels` and the training layout as `loss_inputs` (decoder-only)."""
        layout = dict(pad_id=self.processor.tokenizer.pad_token_id, image_token_id=self.processor.image_token_id,
                      count=tokens)
        prompts, prompt_labels = zip(*(self._prompt_ids(record["instruction"], i) for i, record in enumerate(records)))
        answers = _optional_field(records, "answer", str, "a str") if self.prompt_only else \
            [record["answer"] for record in records]
        answers = None if answers is None else [self._answer_ids(a, i) for i, a in enumerate(answers)]
        if not self.prompt_only:
            return training_sequences(list(prompts), answers, decoder_only=self.decoder_only,
                                      prompt_labels=list(prompt_labels), **layout)
        if not self.decoder_only:  # the encoder reads the prompt alone in both layouts
            text = training_sequences(list(prompts), answers or [[]] * len(prompts), decoder_only=False, **layout)
            return text if answers is not None else {k: v for k, v in text.items() if k != "labels"}
        input_ids, attention_mask = generation_prompts(list(prompts), **layout)
        text = {"input_ids": input_ids, "attention_mask": attention_mask}
        if answers is not None:
            text["labels"] = pad_right(answers, IGNORE_INDEX)[0]  # [B, L_answer]: the references
            text["loss_inputs"] = training_sequences(list(prompts), answers, decoder_only=True, **layout)
        return text

    def _pixel_values(self, records: Sequence[Mapping]) -> tuple[torch.Tensor, int]:
        """`(pixel_values, visual tokens per example)`: `[B, 3, H, W]` and Q for image records; `[B, T, 3, H, W]`
        and T * Q for video records (T frames per clip)."""
        kinds = {visual_field(record) for record in records}
        if kinds == {"image"}:
            pixels = self.processor.preprocess_images([record["image"] for record in records])
            return pixels, self.processor.num_query_tokens
        if len(kinds) > 1:
            raise ValueError("A batch mixes 'image' and 'video' records; batch images and videos separately.")
        if not hasattr(self.processor, "preprocess_videos"):
            raise TypeError(f"Video records need an InstructBlipVideoProcessor, found {type(self.processor).__name__}.")
        pixels = self.processor.preprocess_videos([record["video"] for record in records])  # [B, T, 3, H, W]
        return pixels, pixels.shape[1] * self.processor.num_query_tokens

    # --- batch ----------------------------------------------------------------------------------------------
    def __call__(self, records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        _check_records(records, answer_required=not self.prompt_only)
        pixel_values, tokens = self._pixel_values(records)
        qformer = self.processor.qformer_text([record["instruction"] for record in records],
                                              max_length=self.qformer_max_length)  # left truncated, right padded
        batch = {
            "pixel_values": pixel_values,
            "qformer_input_ids": torch.tensor(qformer["qformer_input_ids"]),
            "qformer_attention_mask": torch.tensor(qformer["qformer_attention_mask"]),
            **self._text(records, tokens),  # input_ids, attention_mask[, labels][, loss_inputs]
        }
        names = _optional_field(records, "dataset", str, "a str")
        image_ids = _optional_field(records, "image_id", numbers.Integral, "an int")
        if names is not None:
            batch["dataset"] = names
        if image_ids is not None:
            batch["image_ids"] = torch.tensor([int(i) for i in image_ids], dtype=torch.long)  # [B], vision cache
        return batch
