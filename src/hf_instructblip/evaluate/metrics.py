"""Zero-shot evaluation metrics: VQA and iVQA accuracy, exact match, ROC AUC, MRR and CIDEr-D.

Plain Python + numpy, no Java. Every function returns a fraction in [0, 1] (CIDEr-D: its usual 0-10 scale).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np

# --- VQA answer normalisation (the official VQA evaluation script's rules) -----------------------------
# Marks the official script deletes (when touching a space) or turns into a space; "." and "'" are handled apart.
_PUNCTUATION = tuple(';/[]"{}()=+\\_-><@`,?!')
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
# The official pattern `(?!<=\d)(\.)(?!\d)` holds a lookahead that never fires, so it reduces to this:
# drop every period not followed by a digit ("3.5" survives, "dog." loses its period).
_PERIOD = re.compile(r"\.(?!\d)")
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset({"a", "an", "the"})
# Canonical contractions; each is also reached from its spellings with one apostrophe (or all) left out.
# The official table spells the "I" forms capitalised, which never match after lower-casing; ours are lower-case.
_CONTRACTIONS = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't he'd "
    "he'd've he's how'd how'll how's i'd've i'm i've isn't it'd it'd've it'll ma'am mightn't mightn't've might've "
    "mustn't must've needn't not've o'clock oughtn't shan't she'd've should've shouldn't shouldn't've somebody'd "
    "somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's something'd something'd've "
    "something'll that's there'd there'd've there're there's they'd they'd've they'll they're they've 'twas wasn't "
    "we'd've we've weren't what'll what're what's what've when's where'd where's where've who'd who'd've who'll "
    "who's who've why'll why're why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've "
    "you'll you're you've"
).split()
# Apostrophe-less spellings -> canonical form ("dont" -> "don't", "couldnt've" -> "couldn't've").
_CONTRACTION_TABLE = {
    variant: word for word in _CONTRACTIONS
    for variant in {word.replace("'", ""), *(word[:i] + word[i + 1:] for i, ch in enumerate(word) if ch == "'")}
    if variant != word
}


def _strip_punctuation(text: str) -> str:
    # Official rule: a mark next to a space (or any mark, once the text holds a digit,digit comma) is deleted;
    # otherwise it becomes a space, so "black-and-white" -> "black and white" but "1,000" -> "1000".
    delete = _COMMA_BETWEEN_DIGITS.search(text) is not None
    out = text
    for mark in _PUNCTUATION:
        out = out.replace(mark, "" if delete or f"{mark} " in text or f" {mark}" in text else " ")
    return _PERIOD.sub("", out)


def normalize_vqa_answer(answer: str) -> str:
    """Normalise an answer as the official VQA evaluation does: punctuation, case, number words, articles,
    contractions.

    Example:
        >>> normalize_vqa_answer("The two dogs, dont they?")
        "2 dogs don't they"
    """
    if not isinstance(answer, str):
        raise TypeError(f"`answer` must be a str, found {type(answer).__name__}.")
    text = _strip_punctuation(answer.replace("\n", " ").replace("\t", " ").strip())
    words = [_NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(_CONTRACTION_TABLE.get(word, word) for word in words if word not in _ARTICLES)


# --- accuracies -------------------------------------------------------------------------------------------
def _check_pairs(predictions: Sequence, references: Sequence, ref_name: str = "references") -> None:
    if isinstance(predictions, str) or isinstance(references, str):
        raise TypeError(f"`predictions` and `{ref_name}` must be sequences (one item per example), found a str.")
    if len(predictions) != len(references):
        raise ValueError(f"`predictions` and `{ref_name}` must have one item per example: found {len(predictions)} "
                         f"predictions and {len(references)} {ref_name}.")
    if len(predictions) == 0:
        raise ValueError("`predictions` is empty: there is nothing to score.")


def vqa_example_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy of one prediction against the human answers (usually 10): min(#matching humans / 3, 1),
    averaged over the leave-one-out subsets, after `normalize_vqa_answer` on both sides (the official script only
    strips punctuation from the human answers, which its annotation files ship normalised: the same result).

    Example:
        >>> vqa_example_accuracy("Two.", ["2"] * 3 + ["3"] * 7)
        0.9
    """
    if isinstance(answers, str) or len(answers) == 0:
        raise ValueError(f"`answers` must be a non-empty list of human answers, found {answers!r}.")
    matches = sum(normalize_vqa_answer(answer) == normalize_vqa_answer(prediction) for answer in answers)
    if len(answers) == 1:
        return min(matches / 3, 1.0)
    # Leaving out a matching answer leaves matches - 1 matches; leaving out any other leaves all of them.
    left_out_match = min((matches - 1) / 3, 1.0) * matches
    left_out_other = min(matches / 3, 1.0) * (len(answers) - matches)
    return (left_out_match + left_out_other) / len(answers)


def vqa_accuracy(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Mean `vqa_example_accuracy` over examples; `references[i]` holds example i's human answers."""
    _check_pairs(predictions, references)
    return float(np.mean([vqa_example_accuracy(p, r) for p, r in zip(predictions, references)]))


def ivqa_accuracy(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """iVQA accuracy (Yang et al., 2021): the mean over examples of min(#annotators who gave the prediction / 2, 1),
    after `normalize_vqa_answer` on both sides.

    Example:
        >>> ivqa_accuracy(["Two", "3"], [["2", "two", "3"], ["3", "4"]])
        0.75
    """
    _check_pairs(predictions, references)
    matches = [sum(normalize_vqa_answer(a) == normalize_vqa_answer(p) for a in answers)
               for p, answers in zip(predictions, references)]
    return float(np.mean([min(m / 2, 1.0) for m in matches]))


def exact_match_accuracy(
    predictions: Sequence, references: Sequence, normalize: Callable[[str], str] | None = normalize_vqa_answer
) -> float:
    """Fraction of predictions equal to their reference, after `normalize` on strings (None: compare as is).

    Example:
        >>> exact_match_accuracy(["Yes", "two"], ["yes", "3"])
        0.5
    """
    _check_pairs(predictions, references)

    def canon(value):
        return normalize(value) if normalize is not None and isinstance(value, str) else value

    return sum(canon(p) == canon(r) for p, r in zip(predictions, references)) / len(predictions)


# --- ranking metrics ------------------------------------------------------------------------------------------
def roc_auc(labels: Sequence[int], scores: Sequence[float]) -> float:
    """Area under the ROC curve for binary `labels` (0/1) and `scores` (higher = more likely 1): the probability
    that a random positive outscores a random negative, ties counting one half (the Mann-Whitney U statistic from
    average ranks; equals sklearn's `roc_auc_score`)."""
    _check_pairs(scores, labels, "labels")
    y = np.asarray(labels)
    s = np.asarray(scores, dtype=np.float64)
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"`labels` must be 0 or 1, found the values {sorted(set(y.tolist()))}.")
    if np.isnan(s).any():
        raise ValueError("`scores` holds NaN.")
    positives = int(y.sum())
    negatives = len(y) - positives
    if positives == 0 or negatives == 0:
        raise ValueError(f"ROC AUC needs both classes in `labels`; found {positives} positives, {negatives} negatives.")
    # Average 1-based rank of each distinct score: tied scores share the mean of the ranks they span.
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    first_rank = np.cumsum(counts) - counts + 1
    ranks = (first_rank + (counts - 1) / 2)[inverse]
    positive_rank_sum = ranks[y == 1].sum()
    return float((positive_rank_sum - positives * (positives + 1) / 2) / (positives * negatives))


def target_rank(scores: Sequence[float], target: int) -> int:
    """1-based rank of candidate `target` by descending score; ties rank it last among equals (pessimistic,
    so a constant scorer cannot look perfect)."""
    values = [float(v) for v in scores]
    if not 0 <= target < len(values):
        raise ValueError(f"`target` must index one of the {len(values)} candidates, found {target}.")
    mine = values[target]
    return sum(v >= mine for i, v in enumerate(values) if i != target) + 1


def mean_reciprocal_rank(scores: Sequence[Sequence[float]], targets: Sequence[int]) -> float:
    """Mean of 1 / `target_rank` over examples (Visual Dialog's MRR); `scores[i]` scores example i's candidates.

    Example:
        >>> mean_reciprocal_rank([[0.1, 0.9, 0.5], [0.3, 0.2]], [2, 0])
        0.75
    """
    _check_pairs(scores, targets, "targets")
    return float(np.mean([1.0 / target_rank(s, t) for s, t in zip(scores, targets)]))


# --- CIDEr-D ----------------------------------------------------------------------------------------------------
@dataclass
class CiderResult:
    """`score`: corpus CIDEr-D (mean over images); `scores`: one per image, in input order."""

    score: float
    scores: list[float]


def _ngram_counts(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + k]) for k in range(1, n + 1) for i in range(len(tokens) - k + 1))


def _tfidf(counts: Counter, doc_freq: Counter, log_num_images: float, n: int):
    """Per n-gram order: tf-idf vector, its L2 norm; plus the sentence length CIDEr-D's penalty uses."""
    vectors = [dict() for _ in range(n)]
    for ngram, tf in counts.items():
        vectors[len(ngram) - 1][ngram] = tf * (log_num_images - math.log(max(1.0, doc_freq[ngram])))
    norms = [math.sqrt(sum(v * v for v in vec.values())) for vec in vectors]
    # The reference code counts *bigrams* as the length (its `n == 1` tests a 0-based order); kept for parity.
    length = sum(tf for ngram, tf in counts.items() if len(ngram) == 2)
    return vectors, norms, length


def cider_d(
    predictions: Sequence[str], references: Sequence[Sequence[str]], tokenize: Callable[[str], list[str]] = str.split,
    n: int = 4, sigma: float = 6.0,
) -> CiderResult:
    """CIDEr-D (Vedantam et al., 2015) as computed by the coco-caption reference code, tokenisation aside.

    Per image: tf-idf n-gram vectors (idf over the images' reference sets), clipped cosine similarity to each
    reference, times a Gaussian length penalty; averaged over n = 1..4 and the references, times 10. `tokenize`
    defaults to whitespace split (pass PTB-style lower-cased text to match COCO numbers). A single image scores 0
    (every idf is 0), as in the reference.

    Example:
        >>> round(cider_d(["a dog runs", "a cat sleeps"], [["a dog is running"], ["the cat sleeps"]]).score, 4)
        2.6733
    """
    _check_pairs(predictions, references)
    for i, refs in enumerate(references):
        if isinstance(refs, str) or len(refs) == 0:
            raise ValueError(f"`references[{i}]` must be a non-empty list of reference captions, found {refs!r}.")
    hyp_counts = [_ngram_counts(tokenize(p), n) for p in predictions]
    ref_counts = [[_ngram_counts(tokenize(r), n) for r in refs] for refs in references]
    # Document frequency: in how many images' reference sets each n-gram occurs.
    doc_freq = Counter(ngram for refs in ref_counts for ngram in set().union(*refs))
    log_num_images = math.log(len(references))
    scores = []
    for hyp, refs in zip(hyp_counts, ref_counts):
        vec_h, norm_h, len_h = _tfidf(hyp, doc_freq, log_num_images, n)
        total = 0.0
        for ref in refs:
            vec_r, norm_r, len_r = _tfidf(ref, doc_freq, log_num_images, n)
            penalty = math.exp(-((len_h - len_r) ** 2) / (2 * sigma**2))
            for k in range(n):
                # Clipping: a hypothesis n-gram counts at most as often as the reference holds it.
                dot = sum(min(w, vec_r[k].get(g, 0.0)) * vec_r[k].get(g, 0.0) for g, w in vec_h[k].items())
                if norm_h[k] != 0 and norm_r[k] != 0:
                    dot /= norm_h[k] * norm_r[k]
                total += dot * penalty / n
        scores.append(10.0 * total / len(refs))
    return CiderResult(score=float(np.mean(scores)), scores=scores)


def caption_tokens(text: str) -> list[str]:
    """Lower-cased words without punctuation, close to the PTB tokenisation COCO's CIDEr runs on."""
    return re.findall(r"[a-z0-9]+(?:'[a-z]+)?", text.lower())


# --- the one metric table ----------------------------------------------------------------------------------------
# Metric name (as in `templates.HELD_OUT_METRICS`) -> score of generated texts against their references. The runner
# (`evaluate.tasks`) and evaluation during training (`generation_metrics`) both score through it, so the same task
# gives the same number everywhere (CIDEr-D always on `caption_tokens`).
TEXT_METRICS: Mapping[str, Callable[[Sequence[str], Sequence], float]] = MappingProxyType({
    "vqa_accuracy": vqa_accuracy,
    "ivqa_accuracy": ivqa_accuracy,
    "exact_match": exact_match_accuracy,
    "cider": lambda predictions, references: cider_d(predictions, references, tokenize=caption_tokens).score,
})
