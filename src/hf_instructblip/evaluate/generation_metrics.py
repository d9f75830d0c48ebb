"""`generation_metrics`: a `compute_metrics` for evaluation with generation during training
(`Seq2SeqTrainingArguments(predict_with_generate=True)` with `InstructBlipTrainer`).

It decodes the generated answers and scores them through `metrics.TEXT_METRICS`, the table the zero-shot runner
scores with, so `eval_cider` logged during training is the runner's CIDEr on the same predictions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from transformers import EvalPrediction

from .metrics import TEXT_METRICS

# Metrics whose references are one string per example; the others take a list of strings per example.
SINGLE_REFERENCE = frozenset({"exact_match"})


def _check_references(metric: str, references: Sequence) -> list:
    references = list(references)
    single = metric in SINGLE_REFERENCE
    for i, refs in enumerate(references):
        valid = isinstance(refs, str) if single else (
            isinstance(refs, Sequence) and not isinstance(refs, str) and all(isinstance(r, str) for r in refs))
        if not valid:
            raise TypeError(f"`references[{i}]` must be {'a str' if single else 'a list of str'} for "
                            f"metric={metric!r}, found {refs!r}.")
    return references


def _decoder(tokenizer: Any) -> Callable[[Any, str], list[str]]:
    """Token ids `[examples, tokens]` (-100 padded, as the evaluation loop pads) -> stripped texts."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("The tokenizer has neither a pad nor an eos token to decode padding (-100) with; set one.")

    def decode(ids: Any, name: str) -> list[str]:
        if not isinstance(ids, np.ndarray) or ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
            found = f"array {ids.dtype} {list(ids.shape)}" if isinstance(ids, np.ndarray) else type(ids).__name__
            raise ValueError(f"`{name}` must be token ids [examples, tokens] (set predict_with_generate=True in "
                             f"Seq2SeqTrainingArguments), found {found}.")
        ids = np.where(ids < 0, pad, ids)
        return [text.strip() for text in tokenizer.batch_decode(ids.tolist(), skip_special_tokens=True)]

    return decode


def generation_metrics(
    processor: Any, metric: str = "exact_match", references: Sequence | None = None,
) -> Callable[[EvalPrediction], dict[str, float]]:
    """A `compute_metrics` that decodes generated answers and scores them with one of `TEXT_METRICS`.

    Args:
        processor: an `InstructBlipProcessor` (or the LLM tokenizer) to decode ids with.
        metric: "exact_match" (VQA-normalised, one reference per example), "vqa_accuracy" / "ivqa_accuracy" (against
            the human answers) or "cider" (CIDEr-D on `caption_tokens`, as the runner scores captioning).
        references: the evaluation set's references in its order (evaluation keeps the dataset order): a str per
            example for "exact_match", a list of str per example otherwise. None: the decoded `label_ids`, i.e.
            each record's `answer` (not for the VQA accuracies, which need the human answers: one reference caps
            them at 1/3).

    Returns a function `EvalPrediction -> {metric: value}`; `Trainer` logs it as `eval_<metric>`.

    Example:
        >>> answers = [record["answers"] for record in eval_records]  # 10 human answers each
        >>> trainer = InstructBlipTrainer(..., compute_metrics=generation_metrics(processor, "vqa_accuracy", answers))
        >>> trainer.evaluate(max_new_tokens=10)["eval_vqa_accuracy"]
    """
    tokenizer = getattr(processor, "tokenizer", processor)
    if not callable(getattr(tokenizer, "batch_decode", None)):
        raise TypeError(f"`processor` must be an InstructBlipProcessor or a tokenizer (with `batch_decode`), "
                        f"found {type(processor).__name__}.")
    if metric not in TEXT_METRICS:
        raise ValueError(f"`metric` must be one of {sorted(TEXT_METRICS)}, found {metric!r}.")
    decode = _decoder(tokenizer)
    if references is not None:
        references = _check_references(metric, references)
    elif metric.endswith("vqa_accuracy"):
        raise ValueError(f"metric={metric!r} scores an answer against the human answers (usually 10); pass them "
                         "as `references` (one list per example), or use metric='exact_match' for one reference.")
    score = TEXT_METRICS[metric]

    def compute_metrics(eval_prediction: EvalPrediction) -> dict[str, float]:
        predictions = decode(eval_prediction.predictions, "predictions")
        refs = references
        if refs is None:
            if eval_prediction.label_ids is None:
                raise ValueError("The evaluation batches carry no labels: give the records an `answer`, or pass "
                                 "`references` to generation_metrics.")
            refs = decode(eval_prediction.label_ids, "label_ids")
            refs = refs if metric in SINGLE_REFERENCE else [[ref] for ref in refs]
        return {metric: score(predictions, refs)}

    return compute_metrics
