"""`InstructBlipSFTTrainer`: TRL's `SFTTrainer`, fitted to InstructBLIP's Q-Former-only instruction tuning (checked
against TRL 1.16; TRL is imported here only).

Plain `trl.SFTTrainer` trains InstructBLIP wrong: its vision collator gives decoder-only sequences no bos and no eos
on the completion (the model never learns to stop), puts a T5's answer in the encoder input and labels every token
of conversational data, and its fused LM head would shift T5's labels. Here TRL's dataset formats become
`InstructBlipDataCollator` records (LAVIS's layout), decoder-only LLMs take TRL's loss and encoder-decoder ones the
model's own; the class docstring lists every difference.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import datasets
import torch
from transformers import Trainer, TrainingArguments
from trl import SFTConfig, SFTTrainer

from .collator import InstructBlipDataCollator
from .freezing import instructblip_base
from .trainer_glue import InstructBlipTrainerGlue

_DEFAULT_MAX_LENGTH = SFTConfig.__dataclass_fields__["max_length"].default


# --- TRL dataset formats -> InstructBlipDataCollator records ---------------------------------------------
def _text_of(content: Any, where: str) -> str:
    """A message's text: the string, or its text parts joined by a space (as the processor's chat template)."""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        return " ".join(part["text"] for part in content if isinstance(part, Mapping) and part.get("type") == "text")
    raise TypeError(f"{where}: message content must be a str or a list of parts, found {type(content).__name__}.")


def _turns(messages: Any, roles: tuple[str, ...], where: str) -> list[Mapping]:
    """`messages` checked to hold exactly one message per role in `roles`, in that order (InstructBLIP is
    single-turn: the chat template keeps the last user turn only, so other turns would silently vanish)."""
    if not isinstance(messages, Sequence) or isinstance(messages, str):
        raise TypeError(f"{where}: expected a list of messages, found {type(messages).__name__}.")
    found = tuple(message.get("role") if isinstance(message, Mapping) else type(message).__name__
                  for message in messages)
    if found != roles:
        raise ValueError(f"{where}: expected the roles {list(roles)} (InstructBLIP trains one answer to one "
                         f"instruction), found {list(found)}.")
    return list(messages)


def _image_of(example: Mapping, index: int) -> Any:
    """The one image of an example: `image`, or `images` holding exactly one."""
    if example.get("image") is not None:
        return example["image"]
    images = example.get("images")
    if not isinstance(images, Sequence) or len(images) != 1:
        found = "no 'images'" if images is None else f"{len(images) if isinstance(images, Sequence) else images!r}"
        raise ValueError(f"example {index}: 'images' must be a list of exactly one image (InstructBLIP reads one "
                         f"image per example), found {found}.")
    return images[0]


def trl_record(example: Mapping[str, Any], processor: Any, index: int = 0) -> dict[str, Any]:
    """One example in a TRL dataset format -> an `InstructBlipDataCollator` record `{image, instruction, answer}`.

    Formats: ours (`instruction` / `answer`, returned unchanged), prompt-completion (`prompt` / `completion`, plain
    strings or one user message / one assistant message) and conversational (`messages`: one user message, then one
    assistant message), each with `images` (a list of one image) or `image`. The instruction is the user message
    rendered by the processor's chat template (what `processor.apply_chat_template` gives `generate` at inference);
    the answer is the assistant's text. Other fields (`dataset`, `image_id`) are kept.

    Example:
        >>> trl_record({"images": [image], "prompt": "What is shown?", "completion": "a dog"}, processor)
        {'image': <PIL.Image...>, 'instruction': 'What is shown?', 'answer': 'a dog'}
    """
    if not isinstance(example, Mapping):
        raise TypeError(f"example {index}: expected a mapping, found {type(example).__name__}.")
    if example.get("instruction") is not None:
        return dict(example)
    where = f"example {index}"
    if example.get("messages") is not None:
        user, assistant = _turns(example["messages"], ("user", "assistant"), f"{where} 'messages'")
    elif example.get("prompt") is not None and example.get("completion") is not None:
        prompt, completion = example["prompt"], example["completion"]
        if isinstance(prompt, str) and isinstance(completion, str):
            user, assistant = None, None
        else:
            user = _turns(prompt, ("user",), f"{where} 'prompt'")[0]
            assistant = _turns(completion, ("assistant",), f"{where} 'completion'")[0]
    else:
        keys = sorted(key for key, value in example.items() if value is not None)
        raise ValueError(f"{where}: expected 'instruction'/'answer', 'prompt'/'completion' or 'messages' with "
                         f"'images'; found the keys {keys} (TRL's language-modelling 'text' has no answer to learn "
                         "apart from its instruction).")
    if user is None:
        instruction, answer = example["prompt"], example["completion"]
    else:
        instruction = processor.apply_chat_template([user], tokenize=False)
        answer = _text_of(assistant["content"], f"{where} assistant message")
    fields = ("images", "image", "messages", "prompt", "completion")
    kept = {key: value for key, value in example.items() if key not in fields}
    return {**kept, "image": _image_of(example, index), "instruction": instruction, "answer": answer}


@dataclasses.dataclass
class TrlFormatCollator:
    """`InstructBlipDataCollator` over examples in TRL's dataset formats (see `trl_record`).

    Example:
        >>> collator = TrlFormatCollator(InstructBlipDataCollator(processor, decoder_only=True))
        >>> collator([{"images": [image], "prompt": "What is shown?", "completion": "a dog"}])["labels"]
    """

    collator: InstructBlipDataCollator

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        processor = self.collator.processor
        return self.collator([trl_record(example, processor, i) for i, example in enumerate(examples)])


# --- the trainer ---------------------------------------------------------------------------------------
def _as_dataset(data: Any, name: str) -> Any:
    """A list of records -> a `datasets.Dataset` (TRL takes no other kind) that hands back the records themselves,
    unencoded (Arrow cannot hold every record: a message whose content is a str next to one with a list of parts);
    a mapping of lists -> a mapping of those; anything else unchanged."""
    if isinstance(data, Mapping) and not isinstance(data, (datasets.Dataset, datasets.IterableDataset)):
        return {key: _as_dataset(value, f"{name}[{key!r}]") for key, value in data.items()}
    if not isinstance(data, (list, tuple)):
        return data
    if not data:
        raise ValueError(f"`{name}` is empty.")
    rows = list(data)
    for index, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise TypeError(f"`{name}[{index}]`: expected a mapping (a record), found {type(row).__name__}.")

    def by_index(batch: dict[str, list[int]]) -> dict[str, list[Any]]:
        picked = [rows[i] for i in batch["index"]]
        keys = dict.fromkeys(key for row in picked for key in row)  # all rows' keys, in order
        return {key: [row.get(key) for row in picked] for key in keys}

    return datasets.Dataset.from_dict({"index": list(range(len(rows)))}).with_transform(by_index)


def _sft_args(args: TrainingArguments | None, model: torch.nn.Module) -> SFTConfig:
    """A copy of `args` as an `SFTConfig` with what InstructBLIP batches need; conflicting settings raise."""
    if args is None:
        name = getattr(model.config, "_name_or_path", "") or "instructblip"
        return _sft_args(SFTConfig(f"{name.rstrip('/').split('/')[-1]}-SFT"), model)
    if not isinstance(args, SFTConfig):
        args = SFTConfig(**{**args.to_dict(), "hub_token": args.hub_token})  # to_dict hides the token
    args = copy.copy(args)  # leave the caller's arguments as they were
    dataset_kwargs = dict(args.dataset_kwargs or {})
    allowed = {  # field -> (found, allowed values)
        "dataset_kwargs['skip_prepare_dataset']": (dataset_kwargs.get("skip_prepare_dataset", True), (True,)),
        "packing": (args.packing, (False,)),
        "padding_free": (args.padding_free, (False,)),
        "pad_to_multiple_of": (args.pad_to_multiple_of, (None,)),
        "max_length": (args.max_length, (_DEFAULT_MAX_LENGTH,)),  # its default: the collator truncates
        "completion_only_loss": (args.completion_only_loss, (None, True)),
    }
    for field, (found, values) in allowed.items():
        if found not in values:
            raise ValueError(
                f"`args.{field}`: expected {' or '.join(map(repr, values))}, found {found!r}. InstructBlipSFTTrainer "
                "batches with InstructBlipDataCollator, which lays out, truncates and pads each example (LAVIS: prompt "
                "cut from the left to `max_input_length`, answer from the right to `max_output_length`, loss on the "
                "answer only); set those on the collator: data_collator=InstructBlipDataCollator(processor, "
                "decoder_only=..., max_input_length=..., max_output_length=...).")
    args.dataset_kwargs = {**dataset_kwargs, "skip_prepare_dataset": True}  # examples are collated on the fly
    args.remove_unused_columns = False  # the collator reads raw fields the model's forward does not take
    args.assistant_only_loss = False  # already so (labels on the answer); TRL's version needs template markers
    return args


class InstructBlipSFTTrainer(InstructBlipTrainerGlue, SFTTrainer):
    """TRL's `SFTTrainer` for InstructBLIP (Q-Former-only instruction tuning, LAVIS's training layout).

    Takes TRL's vision dataset formats (`{"images": [image], "prompt": ..., "completion": ...}`, `messages`, both
    plain or conversational) and `InstructBlipDataCollator` records (`{"image", "instruction", "answer"}`), as a
    `datasets.Dataset`, `IterableDataset` or a list. Differences from `SFTTrainer`:
        - `model` must be an InstructBLIP model instance (load it and call `freeze_for_instruction_tuning` first: from a
          name, TRL would load transformers' own class);
        - `data_collator` defaults to `InstructBlipDataCollator(processing_class, decoder_only=...)` over those
          formats (an `InstructBlipDataCollator` passed in is wrapped the same way); other collators, TRL's
          included, are refused;
        - decoder-only LLMs take TRL's loss (fused LM head, `entropy` and `mean_token_accuracy` metrics);
          encoder-decoder ones the model's own loss (TRL's head would misalign T5's labels), without those metrics,
          so `loss_type="dft"`, `label_smoothing_factor` and `compute_loss_func` are refused there;
        - `remove_unused_columns=False` and `skip_prepare_dataset=True` are set; `max_length`, `packing`,
          `padding_free`, `pad_to_multiple_of`, `completion_only_loss=False`, `formatting_func` and `peft_config`
          (apply PEFT before `freeze_for_instruction_tuning`, see its docs) are refused;
        - as `InstructBlipTrainer` (the shared `InstructBlipTrainerGlue`): `save_trainable_only`,
          `vision_feature_cache`, `dispatch_batches=False` for iterable data, and the trained Q-Former saved next to
          a PEFT adapter.

    Example:
        >>> freeze_for_instruction_tuning(model)
        >>> records = [{"images": [image], "prompt": "What is unusual here?", "completion": "a man ironing"}]
        >>> args = SFTConfig("outputs/sft", per_device_train_batch_size=4, max_steps=100)
        >>> InstructBlipSFTTrainer(model=model, args=args, train_dataset=records, processing_class=processor).train()
    """

    def __init__(self, model: torch.nn.Module, args: TrainingArguments | None = None,
                 data_collator: Callable | None = None, train_dataset: Any = None, eval_dataset: Any = None,
                 processing_class: Any = None, **kwargs: Any) -> None:
        if isinstance(model, str):
            raise TypeError("`model`: expected an InstructBlipForConditionalGeneration instance, found the name "
                            f"{model!r}; load it with InstructBlipForConditionalGeneration.from_pretrained and call "
                            "freeze_for_instruction_tuning(model) first.")
        config = instructblip_base(model).config  # raises for other models
        self._decoder_only = bool(config.use_decoder_only_language_model)
        if kwargs.get("formatting_func") is not None:
            raise ValueError("`formatting_func`: expected None; examples are turned into records on the fly "
                             "(see `trl_record`), not formatted into text.")
        if kwargs.get("peft_config") is not None:
            # TRL's `get_peft_model` would run after `freeze_for_instruction_tuning` and freeze the Q-Former again.
            raise ValueError("`peft_config`: expected None; wrap the model yourself, in this order: `model = "
                             "get_peft_model(model, peft_config)`, then `freeze_for_instruction_tuning(model)`.")
        args = _sft_args(args, model)
        if not self._decoder_only:
            trl_only = {"args.loss_type": (args.loss_type, "nll"),
                        "args.label_smoothing_factor": (args.label_smoothing_factor, 0.0),
                        "compute_loss_func": (kwargs.get("compute_loss_func"), None)}
            for name, (found, expected) in trl_only.items():
                if found != expected:
                    raise ValueError(f"`{name}`: expected {expected!r} for an encoder-decoder LLM, found {found!r}; "
                                     "its loss is the model's own (TRL's fused LM head misaligns T5's labels).")
        if data_collator is not None and not isinstance(data_collator, InstructBlipDataCollator):
            # LAVIS's layout has one writer (`InstructBlipDataCollator`, through `model.layout`); TRL's own collators
            # build others (no bos / eos around prompt and answer, a T5's answer in the encoder input).
            raise TypeError(f"`data_collator`: expected None or an InstructBlipDataCollator (subclass it to collate "
                            f"differently), found {type(data_collator).__name__}.")
        if processing_class is None and isinstance(data_collator, InstructBlipDataCollator):
            processing_class = data_collator.processor
        if processing_class is None:
            raise ValueError("`processing_class`: expected the model's InstructBlipProcessor, found None.")
        if data_collator is None:
            data_collator = InstructBlipDataCollator(processing_class, decoder_only=self._decoder_only)
        self._check_collator(data_collator, config)
        data_collator = TrlFormatCollator(data_collator)
        super().__init__(model, args=args, data_collator=data_collator,
                         train_dataset=_as_dataset(train_dataset, "train_dataset"),
                         eval_dataset=_as_dataset(eval_dataset, "eval_dataset"),
                         processing_class=processing_class, **kwargs)

    @staticmethod
    def _check_collator(collator: InstructBlipDataCollator, config: Any) -> None:
        collator.check_model(config)
        if collator.prompt_only:
            raise ValueError("`data_collator`: expected a training collator, found prompt_only=True (its batches hold "
                             "no answer in the inputs).")

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None) -> Any:
        """TRL's loss for decoder-only LLMs, the model's own for encoder-decoder ones, on LAVIS-layout batches."""
        inputs = self.model_inputs(model, inputs)  # metadata dropped; image_ids -> cached image_embeds
        if self._decoder_only:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        # T5: its decoder position t predicts label t; `Trainer.compute_loss` passes `num_items_in_batch` (exact
        # gradient accumulation) and `fused_head_loss` keeps the [tokens, vocab] logits out of training steps.
        inputs["use_cache"] = False
        if model.training and "labels" in inputs:
            inputs["fused_head_loss"] = True
        return Trainer.compute_loss(self, model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)
