"""Per-episode metrics of predicted class probabilities: discrimination and calibration.

Every metric takes ``probs`` ``(n, C)`` (rows sum to 1) and ``labels`` ``(n,)`` in ``0 … C-1`` and
returns a float. ``METRICS`` lists them in reporting order; ``compute_metrics`` applies all of them
to logits.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from scipy.stats import rankdata


def _check(probs: np.ndarray, labels: np.ndarray) -> None:
    if probs.ndim != 2 or labels.shape != (probs.shape[0],) or probs.shape[0] == 0:
        raise ValueError(f"probs {probs.shape} and labels {labels.shape} must be (n, C) and (n,) with n ≥ 1")


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of samples whose most probable class is the true class."""
    _check(probs, labels)
    return float(np.mean(probs.argmax(axis=1) == labels))


def balanced_accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean recall over the classes present in ``labels`` (absent classes have no recall)."""
    _check(probs, labels)
    predicted = probs.argmax(axis=1)
    return float(np.mean([np.mean(predicted[labels == c] == c) for c in np.unique(labels)]))


def macro_auroc(probs: np.ndarray, labels: np.ndarray) -> float:
    """One-vs-rest AUROC averaged over classes (scikit-learn's ``ovr``/``macro``; plain AUROC for 2 classes).

    Each class present in ``labels`` is scored by its own probability column, with the Mann-Whitney
    statistic (ties count one half). Classes absent from ``labels`` are skipped; NaN when fewer than
    two classes are present, since no class then has negatives.
    """
    _check(probs, labels)
    present = np.unique(labels)
    if len(present) < 2:
        return float("nan")
    ranks = rankdata(probs, axis=0)  # per column, ties get their mean rank
    aurocs = []
    for c in present:
        positive = labels == c
        n_pos, n_neg = int(positive.sum()), int((~positive).sum())
        aurocs.append((ranks[positive, c].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
    return float(np.mean(aurocs))


def _calibration_gaps(probs: np.ndarray, labels: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Per non-empty bin of top-label confidence: ``(bin sizes, |accuracy - mean confidence|)``.

    Bins are ``n_bins`` equal-width intervals ``(lo, hi]`` of ``[0, 1]``; a confidence of exactly 0
    (impossible for a top label, which is at least ``1/C``) would go into the first bin.
    """
    _check(probs, labels)
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    inner_edges = np.linspace(0.0, 1.0, n_bins + 1)[1:-1]
    bins = np.searchsorted(inner_edges, confidence, side="left")
    sizes = np.bincount(bins, minlength=n_bins)
    filled = sizes > 0
    mean_correct = np.bincount(bins, weights=correct, minlength=n_bins)[filled] / sizes[filled]
    mean_confidence = np.bincount(bins, weights=confidence, minlength=n_bins)[filled] / sizes[filled]
    return sizes[filled], np.abs(mean_correct - mean_confidence)


def ece(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """Expected calibration error of the top label (Guo et al., 2017, "On Calibration of Modern Neural
    Networks"): the bin-size-weighted mean of ``|accuracy - confidence|`` over ``n_bins`` equal-width
    confidence bins ``(lo, hi]``."""
    sizes, gaps = _calibration_gaps(probs, labels, n_bins)
    return float(np.sum(sizes * gaps) / np.sum(sizes))


def mce(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """Maximum calibration error (Guo et al., 2017): the largest ``|accuracy - confidence|`` over the
    non-empty bins used by ``ece``."""
    _, gaps = _calibration_gaps(probs, labels, n_bins)
    return float(gaps.max())


def brier(probs: np.ndarray, labels: np.ndarray) -> float:
    """Multi-class Brier score (Brier, 1950): mean over samples of the summed squared error against the
    one-hot label, in ``[0, 2]``. For 2 classes it is twice the binary score of scikit-learn."""
    _check(probs, labels)
    one_hot = np.eye(probs.shape[1])[labels]
    return float(np.mean(np.sum((probs - one_hot) ** 2, axis=1)))


def nll(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log probability of the true class, probabilities clipped below at ``1e-12``."""
    _check(probs, labels)
    return float(-np.mean(np.log(np.maximum(probs[np.arange(len(labels)), labels], 1e-12))))


METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "accuracy": accuracy,
    "balanced_accuracy": balanced_accuracy,
    "macro_auroc": macro_auroc,
    "ece": ece,
    "mce": mce,
    "brier": brier,
    "nll": nll,
}


def softmax(logits: torch.Tensor | np.ndarray) -> np.ndarray:
    """Numerically stable softmax over the last axis.

    Args:
        logits: ``(n, C)``, a tensor on any device or an array.

    Returns:
        ``(n, C)`` float64 probabilities.
    """
    if isinstance(logits, torch.Tensor):
        logits = logits.detach().cpu().double().numpy()
    shifted = np.asarray(logits, dtype=np.float64)
    shifted = shifted - shifted.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def metrics_from_probs(probs: np.ndarray, labels: np.ndarray | torch.Tensor) -> dict[str, float]:
    """All ``METRICS`` of ``(n, C)`` probabilities against ``(n,)`` labels, in registry order."""
    labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels, dtype=np.int64)
    return {name: metric(probs, labels) for name, metric in METRICS.items()}


def compute_metrics(logits: torch.Tensor | np.ndarray, labels: np.ndarray | torch.Tensor) -> dict[str, float]:
    """Softmax ``(n, C)`` logits, then compute all ``METRICS`` against ``(n,)`` labels."""
    return metrics_from_probs(softmax(logits), labels)
