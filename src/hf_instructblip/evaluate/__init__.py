"""Zero-shot evaluation: the held-out tasks, candidate ranking, the official metrics and the resumable runner
(`python -m hf_instructblip.evaluate --help`)."""

from .metrics import (
    CiderResult,
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
from .ranking import CandidateRanking, rank_candidates
from .runner import evaluate, main
from .tasks import TASKS, load_records
