"""Per-episode metrics, confidence intervals, and runners for few-shot, generalised and oracle results."""

from fewshot_med.evaluation.intervals import mean_ci95, paired_difference_ci95, summarize
from fewshot_med.evaluation.metrics import (
    METRICS,
    accuracy,
    adaptive_ece,
    balanced_accuracy,
    brier,
    classwise_ece,
    compute_metrics,
    ece,
    macro_auroc,
    mce,
    metrics_from_probs,
    nll,
    softmax,
)
from fewshot_med.evaluation.runner import (
    GENERALISED_METRICS,
    EpisodeResults,
    evaluate_frozen,
    evaluate_generalised,
    evaluate_images,
    evaluate_oracle,
    score_episodes,
)

__all__ = [
    "GENERALISED_METRICS",
    "METRICS",
    "EpisodeResults",
    "accuracy",
    "adaptive_ece",
    "balanced_accuracy",
    "brier",
    "classwise_ece",
    "compute_metrics",
    "ece",
    "evaluate_frozen",
    "evaluate_generalised",
    "evaluate_images",
    "evaluate_oracle",
    "macro_auroc",
    "mce",
    "mean_ci95",
    "metrics_from_probs",
    "nll",
    "paired_difference_ci95",
    "score_episodes",
    "softmax",
    "summarize",
]
