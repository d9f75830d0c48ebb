"""lmms-eval model plugin: `lmms-eval --model hf_instructblip --model_args pretrained=PATH` runs our InstructBLIP.

lmms-eval (0.7.3 and newer) finds models through the `lmms_eval.models` entry-point group; ours (declared in
pyproject.toml) points at `manifest`, which names `InstructBlipLmms`. Over the harness's own `instructblip` model it
adds batched generation (left-padded batches, answers without the prompt echo), `loglikelihood` (multiple-choice
tasks) and the request's generation settings.

This is the only module that imports lmms_eval; nothing else in the package imports this one, so the package works
without lmms-eval installed.

Known upstream problems (lmms-eval 0.7.3, and its main branch as of 2026-08): `simple_evaluate` needs filelock < 4
(it patches `filelock._api`), and its evaluator turns every `loglikelihood` result `(float, bool)` into a string
before `multiple_choice` scoring, which then fails for every model; `generate_until` tasks are unaffected.

Example:
    $ lmms-eval --model hf_instructblip --model_args pretrained=Salesforce/instructblip-vicuna-7b,dtype=bfloat16 \\
        --tasks mme --batch_size 8 --device cuda
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import PurePath
from typing import Any

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from PIL import Image
from tqdm import tqdm
from transformers import GenerationConfig

from ..model.images import load_image
from ..model.modeling import InstructBlipForConditionalGeneration
from ..model.processing import InstructBlipProcessor, pad_right

MODEL_NAME = "hf_instructblip"
GENERATION_DEFAULTS = ("lmms_eval", "checkpoint")
MULTIPLE_IMAGES = ("concat", "error")
LOGLIKELIHOOD_SCORES = ("loss", "logprob")
# Settings that act only when sampling: dropped for greedy / beam search, where transformers would warn about them.
_SAMPLING_ONLY = ("temperature", "top_p", "top_k", "typical_p", "min_p", "epsilon_cutoff", "eta_cutoff")
# The generation-config fields that say which token is which, kept under the "lmms_eval" defaults.
_TOKEN_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id", "suppress_tokens")
_VIDEO_SUFFIXES = frozenset({".mp4", ".avi", ".mov", ".mkv", ".webm", ".flv", ".wmv", ".m4v"})


def manifest():
    """The `lmms_eval.models` entry point: registers `InstructBlipLmms` under the name `hf_instructblip`.

    lmms-eval calls this while building its model registry (a callable payload), so the import stays inside.

    Example:
        >>> from lmms_eval.models import get_model
        >>> get_model("hf_instructblip") is InstructBlipLmms
        True
    """
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path=f"{__name__}.{InstructBlipLmms.__name__}")


class InstructBlipLmms(lmms):
    """InstructBLIP (ours) as an lmms-eval "simple" model: image + prompt text in, answer text / log-likelihood out.

    Model args (`--model_args k=v,...`): `pretrained` (folder or Hub id, required), `revision`, `device` (default
    cuda when available), `dtype` ("auto", "float32", "bfloat16", "float16"), `batch_size` (better given as
    `--batch_size N`: the CLI always passes its own), `device_map` (e.g. "auto" to spread one model over the GPUs),
    `attn_implementation`, `max_new_tokens` (for tasks that set none; 1024 as lmms-eval's other models),
    `generation_defaults`: "lmms_eval" (greedy, one beam, unless the task says otherwise, as the harness's other
    models) or "checkpoint" (the checkpoint's generation_config, e.g. LAVIS beam search; the task's settings still
    win), `multiple_images`: "concat" (a document with several images gets them side by side in one image, as the
    harness's own InstructBLIP does) or "error", `loglikelihood_score`: what `loglikelihood` returns first, "loss"
    (mean negative log-likelihood per continuation token, lower is better) or "logprob" (summed log-likelihood, higher
    is better); see `loglikelihood`.

    Prompts are the task's text as written (InstructBLIP has no chat format); a literal "<image>" in it is dropped,
    since the processor places the image itself.

    Example:
        >>> from lmms_eval.models import get_model
        >>> lm = get_model("hf_instructblip").create_from_arg_string("pretrained=./ckpt,device=cpu", {"batch_size": 4})
    """

    def __init__(
        self,
        pretrained: str | None = None,
        revision: str | None = None,
        device: str | None = None,
        dtype: str | torch.dtype = "auto",
        batch_size: int | str = 1,
        max_batch_size: int | None = None,
        device_map: str | None = None,
        attn_implementation: str | None = None,
        max_new_tokens: int | str = 1024,
        generation_defaults: str = "lmms_eval",
        multiple_images: str = "concat",
        loglikelihood_score: str = "loss",
    ) -> None:
        super().__init__()
        if not pretrained:
            raise ValueError("`pretrained` is required: pass --model_args pretrained=<checkpoint folder or Hub id>.")
        self.batch_size_per_gpu = _positive_int("batch_size", batch_size)
        del max_batch_size  # simple_evaluate passes it for `batch_size=auto`, which we do not support
        self.max_new_tokens = _positive_int("max_new_tokens", max_new_tokens)
        self.generation_defaults = _one_of("generation_defaults", generation_defaults, GENERATION_DEFAULTS)
        self.multiple_images = _one_of("multiple_images", multiple_images, MULTIPLE_IMAGES)
        self.loglikelihood_score = _one_of("loglikelihood_score", loglikelihood_score, LOGLIKELIHOOD_SCORES)
        device_map = device_map or None  # "" from a model_args string means unset

        # Data parallel under `accelerate launch`: lmms-eval shares the documents out; each process takes its GPU.
        from accelerate import PartialState

        state = PartialState()
        if state.num_processes > 1:
            if device_map is not None:
                raise ValueError(f"`device_map={device_map}` spreads one process's model over the GPUs; found "
                                 f"{state.num_processes} processes. Launch one process, or leave device_map out.")
            device = f"cuda:{state.local_process_index}"
        self._rank, self._world_size = state.process_index, state.num_processes
        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

        revision = None if revision is None else str(revision)  # model_args turn an all-digit revision into an int
        model = InstructBlipForConditionalGeneration.from_pretrained(
            pretrained, revision=revision, dtype=_dtype(dtype), device_map=device_map,
            attn_implementation=attn_implementation,
        )
        self._model = (model if device_map is not None else model.to(self._device)).eval()
        self._processor = InstructBlipProcessor.from_pretrained(pretrained, revision=revision)
        self._warned: set[str] = set()

    # --- what lmms-eval reads ---------------------------------------------------------------------------
    @property
    def model(self) -> InstructBlipForConditionalGeneration:
        return self._model

    @property
    def processor(self) -> InstructBlipProcessor:
        return self._processor

    @property
    def tokenizer(self):
        return self._processor.tokenizer

    @property
    def config(self):
        return self._model.config

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def eot_token_id(self) -> int | None:
        return self.tokenizer.eos_token_id

    # --- generation -------------------------------------------------------------------------------------
    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Answers for `generate_until` requests, in request order.

        Requests are grouped by their generation settings and sorted longest prompt first, then run `batch_size`
        at a time; each answer is cut at the first of the request's `until` strings.
        """
        args = [_request_args(request, 6, "generate_until") for request in requests]
        lengths = [len(self.tokenizer(self._prompt(a[0]))["input_ids"]) for a in args]
        results: list[str | None] = [None] * len(args)
        with tqdm(total=len(args), disable=self.rank != 0, desc="hf_instructblip generate_until") as bar:
            for batch in _batches(lengths, [_settings_key(a[1]) for a in args], self.batch_size):
                for index, text in zip(batch, self._generate_batch([args[i] for i in batch])):
                    results[index] = text
                    self.cache_hook.add_partial("generate_until", (args[index][0], args[index][1]), text)
                bar.update(len(batch))
        return results

    def _generate_batch(self, batch: list[tuple]) -> list[str]:
        settings, until = generation_settings(batch[0][1], warn=self._warn_once)  # one group: the same settings
        base = self._base_generation_config()
        if until:
            # Stop each row as soon as it writes a stop string (the cut below still trims the rest of that token).
            settings.update(stop_strings=until, tokenizer=self.tokenizer)
        inputs = self._inputs(batch)
        sequences = self._model.generate(**inputs, generation_config=base, **settings)
        # Decoder-only LLMs return prompt + answer: the processor checks the echo and removes it.
        echoed = inputs["input_ids"] if self.config.use_decoder_only_language_model else None
        return [cut_at_stop_strings(text, until) for text in self._processor.post_process_generation(sequences, echoed)]

    def _base_generation_config(self) -> GenerationConfig:
        """Where unset generation settings come from (see `generation_defaults` in the class docstring)."""
        checkpoint = self._model.generation_config
        if self.generation_defaults == "checkpoint":
            return checkpoint
        tokens = {name: getattr(checkpoint, name, None) for name in _TOKEN_FIELDS}
        return GenerationConfig(**tokens, do_sample=False, num_beams=1, max_new_tokens=self.max_new_tokens)

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError(
            "hf_instructblip does not support `generate_until_multi_round` tasks: InstructBLIP answers one prompt "
            "about one image, with no conversation state. Run single-round (`generate_until`) tasks."
        )

    # --- log-likelihood ---------------------------------------------------------------------------------
    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """`(score, is_greedy)` per request, in request order, from log p(continuation tokens | image, context).

        `score` with `loglikelihood_score="loss"` (default): the mean negative log-likelihood per continuation token.
        lmms-eval's built-in models return this (their forward's loss), and lmms-eval's `multiple_choice` scoring
        picks the choice with the *smallest* value (np.argmin; lmms-eval issue #370), so a log-likelihood there would
        pick the least likely choice. With "logprob": the summed log-likelihood (lm-evaluation-harness's contract,
        the docstring of `lmms.loglikelihood`), for code that reads it as such.
        `is_greedy`: every continuation token is the argmax given the image, the context and the tokens before it.
        Decoder-only LLMs score the continuation's tokens as they fall in the tokenized `context + continuation`
        (whitespace at the end of the context moves to the continuation); encoder-decoder LLMs score the
        continuation's own tokens as the decoder's target. No EOS is added.
        """
        rows = [self._loglikelihood_row(_request_args(request, 6, "loglikelihood")) for request in requests]
        lengths = [len(row["prompt_ids"]) + len(row["continuation_ids"]) for row in rows]
        results: list[tuple[float, bool] | None] = [None] * len(rows)
        with tqdm(total=len(rows), disable=self.rank != 0, desc="hf_instructblip loglikelihood") as bar:
            for batch in _batches(lengths, [None] * len(rows), self.batch_size):
                scores = self._score_batch([rows[i] for i in batch])
                for index, score in zip(batch, scores):
                    results[index] = score
                    self.cache_hook.add_partial("loglikelihood", (rows[index]["context"], rows[index]["continuation"]),
                                                score)
                bar.update(len(batch))
        return results

    def _loglikelihood_row(self, args: tuple) -> dict[str, Any]:
        context, target, doc_to_visual, doc_id, task, split = args
        continuation = target(self.task_dict[task][split][doc_id]) if callable(target) else target
        if not isinstance(continuation, str):
            raise TypeError(f"The continuation of doc {doc_id} of task {task!r} must be a string, "
                            f"found {type(continuation).__name__}: {continuation!r}.")
        context = self._prompt(context)
        # Whitespace belongs to the next word's token: "Answer: " + "yes" is scored as "Answer:" + " yes".
        stripped = context.rstrip()
        continuation, context = context[len(stripped):] + continuation, stripped
        if self.config.use_decoder_only_language_model:
            # The continuation's tokens are those of the joint text beyond the context's tokens, so that a merge
            # across the boundary is scored as the model would read the joint text.
            context_ids = self.tokenizer(context, add_special_tokens=False)["input_ids"]
            joint_ids = self.tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
            continuation_ids = joint_ids[len(context_ids):]
        else:
            continuation_ids = self.tokenizer(continuation, add_special_tokens=False)["input_ids"]
        if not continuation_ids:
            raise ValueError(f"The continuation {continuation!r} of doc {doc_id} of task {task!r} has no tokens "
                             "after the context: nothing to score.")
        prompt_ids = self.tokenizer(context)["input_ids"]  # only for sorting by length
        return dict(context=context, continuation=continuation, continuation_ids=continuation_ids,
                    prompt_ids=prompt_ids, visual=(doc_to_visual, doc_id, task, split))

    @torch.no_grad()
    def _score_batch(self, rows: list[dict[str, Any]]) -> list[tuple[float, bool]]:
        inputs = self._inputs([(row["context"], None, *row["visual"]) for row in rows])
        targets = [torch.tensor(row["continuation_ids"], device=self._device) for row in rows]
        if self.config.use_decoder_only_language_model:
            # One right-padded row per request: the unpadded prompt, then the continuation. Right padding keeps every
            # row's positions at 0.. as when it runs alone; the logit before each continuation token predicts it.
            prompts = [ids[mask.bool()].tolist() for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"])]
            ids, mask = pad_right([p + row["continuation_ids"] for p, row in zip(prompts, rows)],
                                  self.tokenizer.pad_token_id or 0, self._device)
            logits = self._model(**{**inputs, "input_ids": ids, "attention_mask": mask}).logits  # [B, L, V]
            per_row = [logits[i, len(p) - 1 : len(p) - 1 + len(t)] for i, (p, t) in enumerate(zip(prompts, targets))]
        else:
            labels, label_mask = pad_right([row["continuation_ids"] for row in rows], 0, self._device)
            decoder_input_ids = self._model.language_model.prepare_decoder_input_ids_from_labels(
                labels=labels.masked_fill(label_mask == 0, -100))
            logits = self._model(**inputs, decoder_input_ids=decoder_input_ids).logits  # [B, T, V]
            per_row = [logits[i, : len(t)] for i, t in enumerate(targets)]
        scores = []
        for row_logits, target in zip(per_row, targets):
            log_probs = row_logits.float().log_softmax(dim=-1)  # [T, V]
            total = log_probs.gather(-1, target.unsqueeze(-1)).sum().item()
            score = total if self.loglikelihood_score == "logprob" else -total / len(target)
            scores.append((score, bool((log_probs.argmax(dim=-1) == target).all())))
        return scores

    # --- inputs -----------------------------------------------------------------------------------------
    def _prompt(self, context: str) -> str:
        """The task's text as the prompt. A literal image token is dropped: it would add placeholders that the model
        rejects (the processor places the image). Trailing whitespace stays: `loglikelihood` moves it."""
        if not isinstance(context, str):
            raise TypeError(f"A request's context must be a string, found {type(context).__name__}: {context!r}.")
        return context.replace(self._processor.image_token, "").lstrip()

    def _inputs(self, batch: Sequence[tuple]) -> dict[str, torch.Tensor]:
        """Processor tensors (left-padded prompts) for `(context, _, doc_to_visual, doc_id, task, split)` rows."""
        images = [self._image(*row[2:6]) for row in batch]
        inputs = self._processor(images=images, text=[self._prompt(row[0]) for row in batch], return_tensors="pt")
        return inputs.to(self._device, dtype=self._model.dtype)  # BatchFeature: casts only the pixels

    def _image(self, doc_to_visual: Callable, doc_id: int, task: str, split: str) -> Image.Image:
        """The document's one image (several are put side by side, or refused, per `multiple_images`)."""
        visuals = doc_to_visual(self.task_dict[task][split][doc_id])
        visuals = [v for v in (visuals if isinstance(visuals, (list, tuple)) else [visuals]) if v is not None]
        where = f"doc {doc_id} of task {task!r}"
        if not visuals:
            raise ValueError(f"{where} has no image: InstructBLIP answers about an image; text-only tasks are "
                             "not supported.")
        for visual in visuals:
            if isinstance(visual, (str, PurePath)) and PurePath(visual).suffix.lower() in _VIDEO_SUFFIXES:
                raise ValueError(f"{where} gives a video ({visual}); hf_instructblip in lmms-eval reads images. "
                                 "For video QA use `python -m hf_instructblip.evaluate` with the video model.")
        images = [load_image(v, where=f"{where}, image {i}") for i, v in enumerate(visuals)]
        if len(images) == 1:
            return images[0]
        if self.multiple_images == "error":
            raise ValueError(f"{where} has {len(images)} images; InstructBLIP reads one per prompt. Pass "
                             "multiple_images=concat to put them side by side in one image.")
        self._warn_once("concat", f"Documents with several images (first: {where}) get them side by side in one "
                                  "image, as lmms-eval's own InstructBLIP does.")
        return side_by_side(images)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(f"hf_instructblip: {message}", stacklevel=3)


# --- helpers (plain functions, tested on their own) ---------------------------------------------------------
def generation_settings(
    gen_kwargs: Mapping[str, Any] | None, warn: Callable[[str, str], None] | None = None
) -> tuple[dict[str, Any], list[str]]:
    """A task's `generation_kwargs` -> (`generate` keywords, stop strings).

    As lmms-eval's models read them: `until` (a string or a list) are stop strings; `temperature` 0 means greedy
    and a positive one means sampling unless `do_sample` says otherwise; None values mean "not set". Settings that
    only act when sampling are dropped otherwise. Keys that are no generation setting (e.g. "image_aspect_ratio", for
    other models) are dropped, with a warning.

    Example:
        >>> generation_settings({"until": "\\n", "temperature": 0, "top_p": None, "max_new_tokens": 16})
        ({'max_new_tokens': 16, 'do_sample': False}, ['\\n'])
    """
    settings = {k: v for k, v in dict(gen_kwargs or {}).items() if v is not None}
    until = settings.pop("until", [])
    if isinstance(until, str):
        until = [until]
    if not isinstance(until, (list, tuple)) or not all(isinstance(u, str) for u in until):
        raise TypeError(f"`until` in generation_kwargs must be a string or a list of strings, found {until!r}.")
    known = GenerationConfig().to_dict()
    for key in [k for k in settings if k not in known]:
        if warn is not None:
            warn(f"gen:{key}", f"generation_kwargs[{key!r}] is no transformers generation setting; ignored.")
        del settings[key]
    temperature = settings.get("temperature")
    if "do_sample" not in settings and temperature is not None:
        settings["do_sample"] = temperature > 0
    if temperature == 0:  # lmms-eval's way of saying greedy, whatever `do_sample` says
        settings["do_sample"] = False
    if settings.get("do_sample") is False:
        for key in _SAMPLING_ONLY:
            settings.pop(key, None)
    return settings, [u for u in until if u]


def cut_at_stop_strings(text: str, until: Sequence[str]) -> str:
    """`text` up to the first occurrence of any stop string, stripped.

    Example:
        >>> cut_at_stop_strings("yes.\\nQuestion: no", ["\\n", "Question:"])
        'yes.'
    """
    end = min([text.find(stop) for stop in until if stop in text], default=len(text))
    return text[:end].strip()


def side_by_side(images: Sequence[Image.Image]) -> Image.Image:
    """Images in a row on a white canvas, each scaled to the tallest one's height (aspect ratio kept)."""
    height = max(image.height for image in images)
    scaled = [image.resize((max(1, round(image.width * height / image.height)), height)) for image in images]
    canvas = Image.new("RGB", (sum(image.width for image in scaled), height), (255, 255, 255))
    x = 0
    for image in scaled:
        canvas.paste(image, (x, 0))
        x += image.width
    return canvas


def _batches(lengths: Sequence[int], groups: Sequence[Any], size: int) -> Iterator[list[int]]:
    """Indices in batches of at most `size`, never mixing groups, longest first within a group (as lmms-eval's
    models: a too-large batch fails at once, and rows of similar length waste little padding)."""
    members: dict[Any, list[int]] = {}
    for index, group in enumerate(groups):
        members.setdefault(group, []).append(index)
    for indices in members.values():
        indices = sorted(indices, key=lambda i: -lengths[i])  # stable: equal lengths keep request order
        for start in range(0, len(indices), size):
            yield indices[start : start + size]


def _settings_key(gen_kwargs: Any) -> str:
    """A hashable stand-in for a request's generation settings (requests batch together only when equal)."""
    return json.dumps(gen_kwargs, sort_keys=True, default=repr)


def _request_args(request: Instance, expected: int, kind: str) -> tuple:
    args = request.args
    if len(args) != expected:
        second = "gen_kwargs" if kind == "generate_until" else "continuation"
        raise ValueError(
            f"A `{kind}` request must hold {expected} arguments (context, {second}, doc_to_visual, doc_id, task, "
            f"split), found {len(args)}: {args!r}. Requests without an image (e.g. the unconditional ones of "
            "`acc_mutual_info`) are not supported: InstructBLIP needs an image."
        )
    return args


def _positive_int(name: str, value: Any) -> int:
    """An int >= 1, or its decimal string (model_args arrive as strings)."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        hint = " ('auto' batch sizes are not supported)" if str(value).startswith("auto") else ""
        raise ValueError(f"`{name}` must be a positive integer{hint}, found {value!r}.")
    return value


def _one_of(name: str, value: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {list(choices)}, found {value!r}.")
    return value


def _dtype(value: str | torch.dtype) -> str | torch.dtype:
    """"auto", a torch dtype or its name ("bfloat16") -> what `from_pretrained(dtype=...)` takes."""
    if isinstance(value, torch.dtype) or value == "auto":
        return value
    dtype = getattr(torch, str(value), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"`dtype` must be 'auto' or a torch dtype name such as 'bfloat16', found {value!r}.")
    return dtype
