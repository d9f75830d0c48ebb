"""Image-caption batches for stage-1 pretraining: `{image, caption}` records -> `pixel_values`, `input_ids`,
`attention_mask` (the caption by the Q-Former's BERT tokenizer, padded and right-truncated to 32 tokens, LAVIS
`Blip2Qformer.max_txt_len`). Captions are used as given (LAVIS cleans them in its dataset's caption processor)."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..model.images import load_image
from ..model.validation import check_int

MAX_TXT_LEN = 32


@dataclass
class QFormerPretrainingCollator:
    """Records `{"image": <PIL / array / path / bytes>, "caption": str}` -> a stage-1 batch.

    Args:
        image_processor: the BLIP image processor (e.g. `AutoProcessor.from_pretrained(blip2).image_processor`).
        tokenizer: the Q-Former's BERT tokenizer (with `[DEC]`, as `Salesforce/blip2-itm-vit-g`'s).
        max_length: caption tokens, [CLS] and [SEP] included (LAVIS: 32; captions are padded to it).
        image_root: folder that relative image paths are read from.

    Example:
        >>> collator = QFormerPretrainingCollator(processor.image_processor, processor.tokenizer)
        >>> batch = collator([{"image": "cat.jpg", "caption": "a cat on a mat"}])
        >>> batch["input_ids"].shape
        torch.Size([1, 32])
    """

    image_processor: Any
    tokenizer: Any
    max_length: int = MAX_TXT_LEN
    image_root: str | None = None

    def __post_init__(self) -> None:
        check_int("max_length", self.max_length, minimum=2)
        if not callable(self.image_processor) or not callable(self.tokenizer):
            raise TypeError(f"`image_processor` and `tokenizer` must be callables (a BLIP image processor and a BERT "
                            f"tokenizer), found {type(self.image_processor).__name__} and "
                            f"{type(self.tokenizer).__name__}.")
        self.tokenizer = copy.copy(self.tokenizer)
        self.tokenizer.truncation_side = "right"  # LAVIS stage 1 keeps a caption's beginning

    def check_model(self, config: Any) -> None:
        """The tokenizer's ids fit the model's Q-Former vocabulary, whose last row is `[DEC]`."""
        vocab = config.qformer_config.vocab_size
        if len(self.tokenizer) > vocab:
            raise ValueError(f"tokenizer: {len(self.tokenizer)} tokens do not fit the Q-Former vocabulary ({vocab}).")
        dec = self.tokenizer.convert_tokens_to_ids("[DEC]")
        if dec is not None and dec != self.tokenizer.unk_token_id and dec != vocab - 1:
            raise ValueError(f"tokenizer: `[DEC]` is id {dec}, expected {vocab - 1} (the model's decoder start token, "
                             f"the last row of its Q-Former vocabulary).")

    def __call__(self, records: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if len(records) == 0:
            raise ValueError("The collator received an empty batch (0 records).")
        for index, record in enumerate(records):
            if not isinstance(record, Mapping) or "image" not in record or not isinstance(record.get("caption"), str):
                raise ValueError(f"record {index}: expected a mapping with 'image' and a str 'caption', found "
                                 f"{record if not isinstance(record, Mapping) else sorted(record)!r}.")
        images = [load_image(r["image"], self.image_root, where=f"record {i}: image") for i, r in enumerate(records)]
        pixel_values = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        tokens = self.tokenizer([record["caption"] for record in records], padding="max_length", truncation=True,
                                max_length=self.max_length, return_tensors="pt")
        return {"pixel_values": pixel_values, "input_ids": tokens["input_ids"],
                "attention_mask": tokens["attention_mask"]}
