"""Evaluation metrics against hand-computed cases and published reference values."""

from __future__ import annotations

import pytest

from hf_instructblip.evaluate.metrics import (
    cider_d,
    exact_match_accuracy,
    ivqa_accuracy,
    mean_reciprocal_rank,
    normalize_vqa_answer,
    roc_auc,
    target_rank,
    vqa_accuracy,
    vqa_example_accuracy,
)


# --- VQA normalisation: each case worked through the official script's rules by hand ---------------------------
@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Two dogs.", "2 dogs"),  # number word, trailing period, case
        ("The cat", "cat"),  # article
        ("an apple and a pear", "apple and pear"),
        ("none", "0"),  # the official number map sends "none" to "0"
        ("dont", "don't"),  # contraction restored
        ("couldnt've", "couldn't've"),
        ("Im here", "i'm here"),  # lower-case "I" forms (the official table's capitalised keys never match)
        ("yes!", "yes"),  # mark not touching a space -> space -> trimmed
        ("black-and-white", "black and white"),
        ("hello, world", "hello world"),  # mark next to a space -> deleted
        ("1,000", "1000"),  # digit,digit comma -> every mark deleted
        ("3.5", "3.5"),  # period before a digit survives
        ("  left\tright\n", "left right"),
        ("man's hat", "man's hat"),  # apostrophes are not punctuation here
    ],
)
def test_normalize_vqa_answer(raw, expected):
    assert normalize_vqa_answer(raw) == expected


@pytest.mark.parametrize(("matches", "expected"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_leave_one_out(matches, expected):
    # 10 humans, `matches` say "2". Leaving out a matching human leaves matches-1, any other leaves matches:
    # e.g. 3 -> (3 * min(2/3, 1) + 7 * min(3/3, 1)) / 10 = 0.9.
    answers = ["2"] * matches + ["blue"] * (10 - matches)
    assert vqa_example_accuracy("two", answers) == pytest.approx(expected)


def test_vqa_accuracy_normalises_both_sides_and_averages():
    refs = [["Two"] * 10, ["a dog"] * 2 + ["cat"] * 8]
    assert vqa_accuracy(["2.", "Dog"], refs) == pytest.approx((1.0 + 0.6) / 2)


def test_ivqa_accuracy_by_hand():
    """min(#annotators who gave the answer / 2, 1) after VQA normalisation: 2 matches -> 1, 1 -> 0.5, 0 -> 0."""
    answers = [["2", "two", "3", "3", "4"], ["2", "two", "3", "1", "4"], ["2", "two", "3", "1", "4"]]
    assert ivqa_accuracy(["Two"], answers[:1]) == 1.0
    assert ivqa_accuracy(["3"], answers[1:2]) == 0.5
    assert ivqa_accuracy(["Two", "3", "5"], answers) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="one item per example"):
        ivqa_accuracy(["a"], [])


def test_exact_match_accuracy():
    assert exact_match_accuracy(["Yes", "no", "2"], ["yes", "No.", "two"]) == 1.0
    assert exact_match_accuracy(["Yes", "no", "2"], ["yes", "No.", "two"], normalize=None) == 0.0
    assert exact_match_accuracy([1, 0, 2], [1, 1, 2]) == pytest.approx(2 / 3)  # class indices


# --- ROC AUC ------------------------------------------------------------------------------------------
def test_roc_auc_without_ties():
    # Positives {0.35, 0.8} vs negatives {0.1, 0.4}: 3 of the 4 pairs ordered right (sklearn's docstring example).
    assert roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)


def test_roc_auc_ties_count_half():
    # Positives {0.5, 0.9} vs negatives {0.5, 0.2}: pairs 0.5/0.5 tie (1/2), the other three right -> 3.5 / 4.
    assert roc_auc([0, 1, 0, 1], [0.5, 0.5, 0.2, 0.9]) == pytest.approx(0.875)
    assert roc_auc([1, 0, 1, 0, 0], [0.3] * 5) == pytest.approx(0.5)
    assert roc_auc([1, 1, 0], [0.0, 0.1, 0.9]) == pytest.approx(0.0)


def test_roc_auc_rejects_one_class_and_bad_labels():
    with pytest.raises(ValueError, match="both classes"):
        roc_auc([1, 1], [0.2, 0.3])
    with pytest.raises(ValueError, match="labels"):
        roc_auc([0, 2], [0.2, 0.3])
    with pytest.raises(ValueError, match="one item per example"):
        roc_auc([0, 1, 1], [0.2, 0.3])


# --- MRR ----------------------------------------------------------------------------------------------------------
def test_target_rank_and_ties():
    assert target_rank([0.1, 0.9, 0.5], 1) == 1
    assert target_rank([0.1, 0.9, 0.5], 2) == 2
    assert target_rank([0.1, 0.9, 0.5], 0) == 3
    assert target_rank([0.5, 0.5, 0.1], 0) == 2  # a tie ranks the target last among equals
    assert target_rank([0.7] * 4, 3) == 4


def test_mean_reciprocal_rank():
    # Ranks 1, 2, 4 -> (1 + 1/2 + 1/4) / 3.
    scores = [[0.2, 0.9, 0.1], [0.4, 0.8, 0.6], [0.3, 0.3, 0.3, 0.3]]
    assert mean_reciprocal_rank(scores, [1, 2, 0]) == pytest.approx((1 + 0.5 + 0.25) / 3)
    with pytest.raises(ValueError, match="target"):
        mean_reciprocal_rank([[0.1, 0.2]], [2])


# --- CIDEr-D --------------------------------------------------------------------------------------------------------
# Published values: Maluuba/nlg-eval, nlgeval/tests/test_nlgeval.py (github.com/Maluuba/nlg-eval), which runs the
# coco-caption CIDEr-D scorer on whitespace-split text: 1.242192 on its README example (examples/hyp.txt against
# examples/ref1.txt + ref2.txt) and 0.0 for any single image (idf is log(1 image) = 0).
NLG_EVAL_HYPOTHESES = [
    "this is the model generated sentence1 which seems good enough",
    "this is sentence2 which has been generated by your model",
]
NLG_EVAL_REFERENCES = [
    ["this is one reference sentence for sentence1", "this is one more reference sentence for sentence1"],
    ["this is a reference sentence for sentence2 which was generated by your model",
     "this is the second reference sentence for sentence2"],
]


def test_cider_d_matches_published_nlg_eval_value():
    result = cider_d(NLG_EVAL_HYPOTHESES, NLG_EVAL_REFERENCES)
    assert result.score == pytest.approx(1.242192, abs=1e-6)
    assert len(result.scores) == 2
    assert sum(result.scores) / 2 == pytest.approx(result.score)


def test_cider_d_single_image_is_zero_as_published():
    assert cider_d(["this is a good test"], [["this is a test", "this is also a test"]]).score == 0.0


def test_cider_d_hand_computed_two_images():
    # Image 1: hyp "a b" vs ref "a b"; image 2: hyp "c" vs ref "d". idf: every n-gram is in one of 2 images'
    # references -> weight log 2 - log 1 = log 2 for n-grams of image 1; "c" is in none -> log 2 - log 1 too.
    # Image 1: orders 1 and 2 have identical vectors -> cosine 1; orders 3, 4 empty -> 0; lengths (bigram
    # counts) equal -> no penalty. Score = 10 * (1 + 1 + 0 + 0) / 4 = 5. Image 2: no shared n-gram -> 0.
    result = cider_d(["a b", "c"], [["a b"], ["d"]])
    assert result.scores == pytest.approx([5.0, 0.0])
    assert result.score == pytest.approx(2.5)


def test_cider_d_length_penalty_and_clipping():
    # Image 1: hyp "a a" vs ref "a". Unigram: hyp vec {a: 2w}, ref {a: w} (w = log 2) -> clipped dot
    # min(2w, w) * w = w^2, over norms 2w * w -> 1/2. Bigram (a, a) not in ref -> 0. Lengths (bigram counts):
    # 1 vs 0 -> penalty exp(-1 / 72). Score = 10 * (1/2) * exp(-1/72) / 4.
    import math

    result = cider_d(["a a", "z"], [["a"], ["y"]])
    assert result.scores[0] == pytest.approx(10 * 0.5 * math.exp(-1 / 72) / 4)


def test_cider_d_rejects_bad_input():
    with pytest.raises(ValueError, match="one item per example"):
        cider_d(["a"], [["a"], ["b"]])
    with pytest.raises(ValueError, match=r"references\[0\]"):
        cider_d(["a", "b"], [[], ["b"]])
    with pytest.raises(TypeError, match="sequences"):
        cider_d("a b", [["a b"]])
