"""Processor: images + instructions -> the tensors `InstructBlipForConditionalGeneration` takes.

One call gives `pixel_values` (transformers' BLIP image processor), `input_ids` / `attention_mask` for the LLM
with `num_query_tokens` image placeholders in front of every prompt, and `qformer_input_ids` /
`qformer_attention_mask` for the instruction-aware Q-Former.

Where we differ from transformers' `InstructBlipProcessor`, we follow LAVIS: the Q-Former text is always
truncated from the left to its own limit (`qformer_max_length`, 128) and always padded on the right (its
positions start at 0, so left padding would move every real token); batched LLM prompts are left padded by
default, which batched decoder-only generation needs.
"""


from typing import Any

import torch
from PIL import Image
from transformers import AutoProcessor, BatchFeature, ProcessorMixin
from transformers.processing_utils import ImagesKwargs, ProcessingKwargs, TextKwargs, Unpack
from transformers.tokenization_utils_base import AddedToken

from .configuration import InstructBlipConfig
from .images import to_rgb_images
from .layout import new_tokens, prepend_image_placeholders
from .validation import check_int

DEFAULT_IMAGE_TOKEN = "<image>"
QFORMER_MAX_LENGTH = 128  # LAVIS `max_txt_len` for the Q-Former instruction
# InstructBLIP has no chat format: as in LAVIS, the prompt is the user's text (the last user turn's text parts);
# the processor places the image itself, so image entries of the messages write nothing here.
CHAT_TEMPLATE = (
    "{%- set user = messages | selectattr('role', 'equalto', 'user') | list | last -%}"
    "{%- if user['content'] is string -%}{{ user['content'] }}"
    "{%- else -%}{{ user['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') }}"
    "{%- endif -%}"
)


class InstructBlipProcessorKwargs(ProcessingKwargs, total=False):
    """Call options, as transformers processors take them: flat, or grouped in `text_kwargs` / `images_kwargs` /
    `common_kwargs`. `qformer_max_length` bounds the Q-Former instruction (default: the processor's own)."""

    qformer_max_length: int


IMAGE_KWARGS = frozenset(ImagesKwargs.__annotations__) - {"return_tensors"}
_MODALITY_GROUPS = frozenset({"text_kwargs", "images_kwargs", "videos_kwargs", "audio_kwargs", "common_kwargs"})
_CALL_OPTIONS = frozenset(TextKwargs.__annotations__) | frozenset(ImagesKwargs.__annotations__) | {
    "qformer_max_length", "return_tensors"}


# --- text ---------------------------------------------------------------------------------------------
def as_texts(text: Any) -> list[str]:
    """A prompt or a non-empty list of prompts -> list of prompts."""
    if isinstance(text, str):
        return [text]
    if not isinstance(text, (list, tuple)):
        raise TypeError(f"`text` must be a string or a list of strings, found {type(text).__name__}.")
    if not text:
        raise ValueError("`text` is an empty list: pass at least one prompt.")
    wrong = {i: type(t).__name__ for i, t in enumerate(text) if not isinstance(t, str)}
    if wrong:
        raise TypeError(f"`text` must be a list of strings, found non-strings at (index: type) {wrong}.")
    return list(text)


# --- the processor ------------------------------------------------------------------------------------
class HfInstructBlipProcessor(ProcessorMixin):
    """Images, LLM prompts and Q-Former instructions -> model inputs (drop-in for transformers' processor).

    Holds transformers' BLIP image processor, the LLM tokenizer (gets the image placeholder token when it lacks
    one) and the Q-Former tokenizer. Loads the official `Salesforce/instructblip-*` layout; saves the Q-Former
    tokenizer in `qformer_tokenizer/`. Exported as `hf_instructblip.InstructBlipProcessor`; its own class name
    differs from transformers' so that `AutoProcessor` finds this class in saved folders.

    Batched prompts are padded on the left (what decoder-only generation needs) unless a call passes `padding_side`
    or `processor.padding_side` is changed; that setting is not saved, and not an `__init__` argument: `padding_side`
    is a call option of transformers' processors (`ProcessingKwargs`), which an `__init__` argument would shadow.

    Example:
        >>> processor = InstructBlipProcessor.from_pretrained("Salesforce/instructblip-vicuna-7b")
        >>> inputs = processor(images=[image, image], text=["What is this?", "Describe it."], return_tensors="pt")
        >>> ids = model.generate(**inputs, max_new_tokens=20)
        >>> processor.post_process_generation(ids, inputs["input_ids"])  # answers only, prompt removed
    """

    padding_side: str = "left"  # batched prompts, unless the call says otherwise

    def __init__(
        self,
        image_processor,
        tokenizer,
        qformer_tokenizer,
        num_query_tokens: int = 32,
        image_token: str | None = None,
        qformer_max_length: int = QFORMER_MAX_LENGTH,
        **kwargs,
    ):
        self.num_query_tokens = check_int("num_query_tokens", num_query_tokens)
        self.qformer_max_length = check_int("qformer_max_length", qformer_max_length)
        self.image_token = image_token or getattr(tokenizer, "image_token", None) or DEFAULT_IMAGE_TOKEN
        if self.image_token not in tokenizer.get_vocab():
            # Our model config's `image_token_index` must follow: see `sync_image_token`.
            tokenizer.add_tokens([AddedToken(self.image_token, normalized=False, special=True)], special_tokens=True)
        # A long instruction keeps its end (the question), as LAVIS does and as `InstructBlipDataCollator` trains.
        tokenizer.truncation_side = "left"
        qformer_tokenizer.truncation_side = "left"
        kwargs["chat_template"] = kwargs.get("chat_template") or CHAT_TEMPLATE
        super().__init__(image_processor, tokenizer, qformer_tokenizer, **kwargs)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """As `ProcessorMixin.save_pretrained`; the `auto_map` it writes into the saved files is not left on this
        object or its image processor, so they equal the ones loaded back from them."""
        parts = [part for part in (self, self.image_processor) if "auto_map" not in part.__dict__]
        try:
            return super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            for part in parts:
                part.__dict__.pop("auto_map", None)

    def to_dict(self) -> dict[str, Any]:
        """As `ProcessorMixin.to_dict`, without the `auto_map` that transformers' save puts on the image processor:
        it names this processor (the folder's own `auto_map` does that), and a loaded image processor would keep it."""
        output = super().to_dict()
        if isinstance(output.get("image_processor"), dict):
            output["image_processor"].pop("auto_map", None)
        return output

    @property
    def image_token_id(self) -> int:
        """Id of the image placeholder in the LLM vocabulary (= the model's `config.image_token_index`)."""
        return self.tokenizer.convert_tokens_to_ids(self.image_token)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "qformer_input_ids", "qformer_attention_mask", "pixel_values"]

    # --- images ---------------------------------------------------------------------------------------
    def preprocess_images(self, images: Any, return_tensors: str | None = "pt", **images_kwargs) -> Any:
        """Images in any supported form -> `pixel_values` (`[B, 3, H, W]` for "pt").

        Accepts PIL images (any mode), numpy arrays and torch tensors (HW, HWC or CHW; uint8 0-255 or float
        0-1), one at a time, as a list, or as a `[B, ...]` batch. Extra keywords go to the image processor.
        """
        check_options(images_kwargs)
        return self._pixel_values(to_rgb_images(images), return_tensors, images_kwargs)

    def _pixel_values(self, images: list[Image.Image], return_tensors: str | None, images_kwargs: dict) -> Any:
        return self.image_processor(images, return_tensors=return_tensors, **images_kwargs)["pixel_values"]

    # --- text -----------------------------------------------------------------------------------------
    def _llm_text(
        self, texts: list[str], with_images: bool, tokenizer_kwargs: dict[str, Any], max_length: int | None
    ) -> dict[str, list[list[int]]]:
        """Prompts -> `input_ids` / `attention_mask`, with `num_query_tokens` placeholders in front when there are
        images (before BOS and before any left padding, exactly as transformers and LAVIS lay them out)."""
        placeholders = self.num_query_tokens if with_images else 0
        if max_length is not None:
            if max_length <= placeholders:
                raise ValueError(
                    f"`max_length` counts the {placeholders} image placeholders and must exceed them, "
                    f"found {max_length}."
                )
            max_length -= placeholders  # the limit applies to placeholders + prompt
        encoding = self.tokenizer(texts, max_length=max_length, return_token_type_ids=False, **tokenizer_kwargs)
        ids, mask = encoding["input_ids"], encoding["attention_mask"]
        return {
            "input_ids": prepend_image_placeholders(ids, self.image_token_id, placeholders),  # [B, Q + L]
            "attention_mask": prepend_image_placeholders(mask, 1, placeholders),
        }

    def qformer_text(self, texts: list[str], padding: Any = "longest", max_length: int | None = None) -> dict:
        """Instructions -> `qformer_input_ids` / `qformer_attention_mask` (lists of rows): the Q-Former tokenizer's
        specials kept, text left truncated to `max_length` (default `qformer_max_length`), right padded."""
        max_length = max_length or self.qformer_max_length
        if padding != "max_length":  # pad to `max_length` only when asked; else to the longest row, if at all
            padding = False if padding in (False, None, "do_not_pad") else "longest"
        encoding = self.qformer_tokenizer(
            texts, padding=padding, truncation=True, max_length=max_length, padding_side="right",
            return_token_type_ids=False,
        )
        return {"qformer_input_ids": encoding["input_ids"], "qformer_attention_mask": encoding["attention_mask"]}

    # --- the call -------------------------------------------------------------------------------------
    def __call__(
        self,
        images: Any = None,
        text: str | list[str] | None = None,
        **kwargs: Unpack[InstructBlipProcessorKwargs],
    ) -> BatchFeature:
        """Images and/or prompts -> `BatchFeature` with `pixel_values`, `input_ids`, `attention_mask`,
        `qformer_input_ids`, `qformer_attention_mask` (what was given decides which).

        One image may serve every prompt; otherwise images and prompts pair up one to one. Options follow
        transformers' processors (flat, or in `text_kwargs` / `images_kwargs` / `common_kwargs`; the LLM
        tokenizer's creation options are defaults). Ours: a batch of prompts is padded (a single prompt is not),
        on the processor's `padding_side` (left) unless the call says otherwise; `max_length` bounds placeholders +
        prompt; the Q-Former text has its own bound, `qformer_max_length` (default the processor's, 128).
        """
        if images is None and text is None:
            raise ValueError("Pass `images`, `text` or both; both are None.")
        if kwargs.pop("videos", None) is not None or kwargs.pop("audio", None) is not None:  # chat templates pass None
            raise ValueError("This processor takes `images`; for clips use InstructBlipVideoProcessor(videos=...).")
        check_options(kwargs)
        options = self._merge_kwargs(InstructBlipProcessorKwargs, tokenizer_init_kwargs=self.tokenizer.init_kwargs,
                                     **kwargs)
        text_kwargs, images_kwargs = options["text_kwargs"], options["images_kwargs"]
        return_tensors = text_kwargs.pop("return_tensors", None) or images_kwargs.pop("return_tensors", None)
        images_kwargs.pop("return_tensors", None)
        pil_images = to_rgb_images(images) if images is not None else None
        encoding: dict[str, Any] = {}
        if text is not None:
            texts = as_texts(text)
            if pil_images is not None:
                pil_images = _pair_images(pil_images, len(texts))
            asked = {**kwargs.get("text_kwargs", {}), **kwargs}
            text_kwargs["padding_side"] = _check_padding_side(asked.get("padding_side") or self.padding_side)
            if "padding" not in asked and "padding" not in self.tokenizer.init_kwargs:
                text_kwargs["padding"] = "longest" if len(texts) > 1 else False  # one prompt needs no pad token
            if pil_images is not None and text_kwargs.get("add_special_tokens") is False:
                # TRL's own vision collator (plain `trl.SFTTrainer` given this processor) asks for this, and would
                # then train labels without eos (the model never learns to stop) and put T5's answer in its encoder.
                raise ValueError(
                    "`add_special_tokens=False` with images: InstructBLIP's prompts keep the LLM's special tokens "
                    "(bos before a decoder-only prompt, eos after a T5 encoder prompt), as the model was trained. If "
                    "this is TRL's own collator (plain trl.SFTTrainer with this processor), train with "
                    "hf_instructblip.InstructBlipSFTTrainer, which builds LAVIS's layout with eos on every answer."
                )
            text_kwargs.setdefault("add_special_tokens", True)
            max_length = text_kwargs.pop("max_length", None)
            # The Q-Former always reads `[CLS] text [SEP]`, as in training: `add_special_tokens` is for the LLM.
            encoding.update(self.qformer_text(texts, text_kwargs.get("padding", False),
                                              options.get("qformer_max_length") or self.qformer_max_length))
            encoding.update(self._llm_text(texts, pil_images is not None, text_kwargs, max_length))
        if pil_images is not None:
            encoding["pixel_values"] = self._pixel_values(pil_images, return_tensors, images_kwargs)
        return BatchFeature(encoding, tensor_type=return_tensors)

    # --- outputs --------------------------------------------------------------------------------------
    def post_process_generation(
        self,
        generated_ids: torch.Tensor,
        input_ids: torch.Tensor | None = None,
        skip_special_tokens: bool = True,
    ) -> list[str]:
        """Generated ids -> answer strings. Decoder-only LLMs echo the prompt: pass the prompt's `input_ids`
        and it is removed (checked); encoder-decoder LLMs return only the answer: leave `input_ids` None."""
        texts = self.tokenizer.batch_decode(new_tokens(generated_ids, input_ids),
                                            skip_special_tokens=skip_special_tokens)
        return [t.strip() for t in texts]


InstructBlipProcessor = HfInstructBlipProcessor  # the drop-in name


def check_options(kwargs: dict[str, Any]) -> None:
    """Refuse call options no part of the processor reads (transformers would drop them with a warning)."""
    unknown = set(kwargs) - _CALL_OPTIONS - _MODALITY_GROUPS
    if unknown:
        raise TypeError(
            f"Unknown keyword arguments {sorted(unknown)}. Text options: {sorted(TextKwargs.__annotations__)}, "
            f"qformer_max_length; image processor options: {sorted(ImagesKwargs.__annotations__)}; or group them "
            "as text_kwargs= / images_kwargs= / common_kwargs=."
        )


def _check_padding_side(side: str) -> str:
    if side not in ("left", "right"):
        raise ValueError(f"`padding_side` must be 'left' or 'right', found {side!r}.")
    return side


def _pair_images(images: list[Image.Image], num_texts: int) -> list[Image.Image]:
    """One image per prompt; a single image is shared by every prompt."""
    if len(images) == num_texts:
        return images
    if len(images) == 1:
        return images * num_texts
    raise ValueError(
        f"Got {len(images)} images for {num_texts} prompts in `text`: pass one image per prompt, or one image for all."
    )


def sync_image_token(model: torch.nn.Module, processor: HfInstructBlipProcessor) -> bool:
    """Point `model.config.image_token_index` at the processor's image placeholder, growing the LLM embeddings
    when the token was added to the tokenizer beyond them. Returns whether the embeddings were resized.

    Example:
        >>> processor = InstructBlipProcessor(image_processor, llm_tokenizer, qformer_tokenizer, num_query_tokens=32)
        >>> sync_image_token(model, processor)  # now model(**processor(...)) finds its placeholders
    """
    if model.config.num_query_tokens != processor.num_query_tokens:
        raise ValueError(
            f"The processor writes num_query_tokens={processor.num_query_tokens} placeholders but the model "
            f"expects model.config.num_query_tokens={model.config.num_query_tokens}; build them to agree."
        )
    positions = model.config.qformer_config.max_position_embeddings
    if processor.qformer_max_length > positions:
        raise ValueError(f"The processor's `qformer_max_length` ({processor.qformer_max_length}) exceeds the model's "
                         f"Q-Former, which has {positions} positions; build the processor with "
                         f"qformer_max_length <= {positions}.")
    token_id = processor.image_token_id
    rows = model.get_input_embeddings().weight.shape[0]
    resized = token_id >= rows
    if resized:
        model.resize_token_embeddings(max(len(processor.tokenizer), token_id + 1))
    model.config.image_token_index = token_id
    return resized


# `AutoProcessor.from_pretrained(folder)` -> this class; saves write `auto_map` + code for `trust_remote_code`.
AutoProcessor.register(InstructBlipConfig, HfInstructBlipProcessor, exist_ok=True)
HfInstructBlipProcessor.register_for_auto_class()
