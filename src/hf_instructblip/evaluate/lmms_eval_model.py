"""lmms-eval model plugin: `lmms-eval --model hf_instructblip --model_args pretrained=PATH` runs our InstructBLIP,
found through the `lmms_eval.models` entry point (pyproject.toml -> `manifest`). It generates in batches through
`evaluate.generation` and scores multiple-choice requests through `rank_candidates`. This is the only module that
imports lmms_eval; nothing else imports it.

Known upstream problems (lmms-eval 0.7.3): `simple_evaluate` needs filelock < 4, and its evaluator turns every
`loglikelihood` result into a string before `multiple_choice` scoring, which then fails for every model.

Example:
    $ lmms-eval --model hf_instructblip --model_args pretrained=Salesforce/instructblip-vicuna-7b,dtype=bfloat16 \\
        --tasks mme --batch_size 8 --device cuda
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import PurePath
from typing import Any

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from PIL import Image
from tqdm import tqdm
from transformers import BatchFeature, GenerationConfig

from ..model.images import load_image
from ..model.modeling import InstructBlipForConditionalGeneration
from ..model.processing import InstructBlipProcessor
from ..model.validation import check_choice
from .generation import evaluation_inputs, generate_answers
from .lmms_eval_requests import (
    batches_by_length,
    cut_at_stop_strings,
    generation_settings,
    int_arg,
    parse_dtype,
    request_args,
    settings_key,
    side_by_side,
)
from .ranking import rank_candidates

MODEL_NAME = "hf_instructblip"
GENERATION_DEFAULTS = ("lmms_eval", "checkpoint")
MULTIPLE_IMAGES = ("concat", "error")
LOGLIKELIHOOD_SCORES = ("loss", "logprob")
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
        self.batch_size_per_gpu = int_arg("batch_size", batch_size)
        del max_batch_size  # simple_evaluate passes it for `batch_size=auto`, which we do not support
        self.max_new_tokens = int_arg("max_new_tokens", max_new_tokens)
        self.generation_defaults = check_choice("generation_defaults", generation_defaults, GENERATION_DEFAULTS)
        self.multiple_images = check_choice("multiple_images", multiple_images, MULTIPLE_IMAGES)
        self.loglikelihood_score = check_choice("loglikelihood_score", loglikelihood_score, LOGLIKELIHOOD_SCORES)
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
            pretrained, revision=revision, dtype=parse_dtype(dtype), device_map=device_map,
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
        args = [request_args(request, 6, "generate_until") for request in requests]
        lengths = [len(self.tokenizer(self._prompt(a[0]))["input_ids"]) for a in args]
        results: list[str | None] = [None] * len(args)
        with tqdm(total=len(args), disable=self.rank != 0, desc="hf_instructblip generate_until") as bar:
            for batch in batches_by_length(lengths, [settings_key(a[1]) for a in args], self.batch_size):
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
        answers = generate_answers(self._model, self._processor, self._inputs(batch), generation_config=base,
                                   **settings)
        return [cut_at_stop_strings(text, until) for text in answers]

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
        Requests that share a document and a context (a multiple-choice question's choices) are scored as the
        candidates of one example by `rank_candidates`: the image and the context run once for all of them.
        """
        rows = [self._loglikelihood_row(request_args(request, 6, "loglikelihood")) for request in requests]
        examples: dict[tuple, list[int]] = {}  # (context, document) -> its requests
        for index, row in enumerate(rows):
            examples.setdefault((row["context"], row["visual"]), []).append(index)
        groups = list(examples.values())
        lengths = [len(rows[group[0]]["prompt_ids"]) for group in groups]
        results: list[tuple[float, bool] | None] = [None] * len(rows)
        with tqdm(total=len(rows), disable=self.rank != 0, desc="hf_instructblip loglikelihood") as bar:
            for batch in batches_by_length(lengths, [None] * len(groups), self.batch_size):
                for group, scores in zip((groups[k] for k in batch), self._score_examples([groups[k] for k in batch],
                                                                                            rows)):
                    for index, score in zip(group, scores):
                        results[index] = score
                        self.cache_hook.add_partial("loglikelihood",
                                                    (rows[index]["context"], rows[index]["continuation"]), score)
                    bar.update(len(group))
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

    def _score_examples(self, groups: list[list[int]], rows: list[dict[str, Any]]) -> list[list[tuple[float, bool]]]:
        """`(score, is_greedy)` of every request of each group, a group being one example whose candidates are its
        requests' continuations."""
        first = [rows[group[0]] for group in groups]
        inputs = self._inputs([(row["context"], None, *row["visual"]) for row in first])
        ranking = rank_candidates(self._model, **inputs,
                                  candidates=[[rows[i]["continuation_ids"] for i in group] for group in groups])
        scored = []
        for group, sums, greedy in zip(groups, ranking.scores, ranking.greedy):
            lengths = [len(rows[i]["continuation_ids"]) for i in group]
            values = sums.tolist() if self.loglikelihood_score == "logprob" else \
                [-total / length for total, length in zip(sums.tolist(), lengths)]
            scored.append(list(zip(values, greedy.tolist())))
        return scored

    # --- inputs -----------------------------------------------------------------------------------------
    def _prompt(self, context: str) -> str:
        """The task's text as the prompt. A literal image token is dropped: it would add placeholders that the model
        rejects (the processor places the image). Trailing whitespace stays: `loglikelihood` moves it."""
        if not isinstance(context, str):
            raise TypeError(f"A request's context must be a string, found {type(context).__name__}: {context!r}.")
        return context.replace(self._processor.image_token, "").lstrip()

    def _inputs(self, batch: Sequence[tuple]) -> BatchFeature:
        """Processor tensors (left-padded prompts) for `(context, _, doc_to_visual, doc_id, task, split)` rows."""
        return evaluation_inputs(self._model, self._processor, [self._prompt(row[0]) for row in batch],
                                 images=[self._image(*row[2:6]) for row in batch])

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


