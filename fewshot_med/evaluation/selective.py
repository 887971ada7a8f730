"""Selective prediction: abstain on the least confident samples and measure the risk of the rest.

A classifier that may abstain is judged by its risk-coverage curve (Geifman & El-Yaniv, 2017,
"Selective Classification for Deep Neural Networks"): samples are accepted in order of decreasing
top-label confidence, and at coverage ``k/n`` the risk is the error rate of the ``k`` accepted ones.
AURC, the area under that curve (Geifman et al., 2019, "Bias-Reduced Uncertainty Estimation for Deep
Neural Classifiers"), summarises it: lower is better, and it rewards both accuracy and a confidence
that ranks errors last.

**Ties.** Samples whose top-label confidences are exactly equal cannot be ranked, so they enter
together: every coverage point inside a tie group gets the risk of the whole group's end point. The
results therefore do not depend on the order of tied samples (a constant-confidence model has a flat
curve at its overall error rate).

Every function takes ``probs`` ``(..., n, C)`` (rows sum to 1) and ``labels`` ``(..., n)`` in
``0 … C-1``; leading axes (episodes) are computed at once.
"""

from __future__ import annotations

import math
import numbers

import numpy as np


def _check(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels)
    if probs.ndim < 2 or labels.shape != probs.shape[:-1] or probs.shape[-2] == 0:
        raise ValueError(
            f"probs {probs.shape} and labels {labels.shape} must be (..., n, C) and (..., n) with n ≥ 1"
        )
    return probs, labels.astype(np.int64, copy=False)


def _selective_risks(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``(..., n)`` risk at coverage ``k/n`` for ``k = 1 … n``, tie groups entering together."""
    confidence = probs.max(axis=-1)
    error = (probs.argmax(axis=-1) != labels).astype(np.float64)
    order = np.argsort(-confidence, axis=-1, kind="stable")
    confidence = np.take_along_axis(confidence, order, axis=-1)
    cumulative_errors = np.cumsum(np.take_along_axis(error, order, axis=-1), axis=-1)
    n = confidence.shape[-1]
    positions = np.arange(n)
    # The last position of each tie group, then for every position the end of its group.
    group_last = np.ones(confidence.shape, dtype=bool)
    group_last[..., :-1] = confidence[..., :-1] != confidence[..., 1:]
    end = np.where(group_last, positions, n - 1)
    end = np.flip(np.minimum.accumulate(np.flip(end, axis=-1), axis=-1), axis=-1)
    return np.take_along_axis(cumulative_errors, end, axis=-1) / (end + 1)


def risk_coverage_curve(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Risk-coverage curve of top-label confidence (Geifman & El-Yaniv, 2017).

    Args:
        probs: ``(n, C)`` probabilities (or ``(..., n, C)``: one curve per episode).
        labels: ``(n,)`` (or ``(..., n)``) true classes.

    Returns:
        ``(coverage, risk)``: coverage ``(n,)`` is ``k/n`` for ``k = 1 … n``; risk ``(n,)`` (or
        ``(..., n)``) is the error rate of the ``k`` most confident samples, tied confidences
        entering together (see the module docstring).
    """
    probs, labels = _check(probs, labels)
    n = probs.shape[-2]
    return np.arange(1, n + 1, dtype=np.float64) / n, _selective_risks(probs, labels)


def _value(values: np.ndarray) -> float | np.ndarray:
    """A float for one episode (0-d), else the ``(...)`` array (the convention of ``metrics``)."""
    return float(values) if values.ndim == 0 else values


def aurc(probs: np.ndarray, labels: np.ndarray) -> float | np.ndarray:
    """Area under the risk-coverage curve (Geifman et al., 2019): the mean risk over the ``n`` coverages.

    A perfect ranking (every error less confident than every correct sample) gives the smallest AURC
    possible at the model's accuracy; it is not 0 unless every prediction is right.

    Args:
        probs: ``(..., n, C)`` probabilities, e.g. ``(E, n, C)`` for ``E`` episodes.
        labels: ``(..., n)`` true classes.

    Returns:
        ``(...)`` AURC per episode in ``[0, 1]`` (a float for 2-D input).
    """
    probs, labels = _check(probs, labels)
    return _value(_selective_risks(probs, labels).mean(axis=-1))


def accuracy_at_coverage(probs: np.ndarray, labels: np.ndarray, coverage: float) -> float | np.ndarray:
    """Accuracy on the ``ceil(coverage · n)`` most confident samples (abstaining on the rest).

    Equals ``1 - risk`` of ``risk_coverage_curve`` at that coverage, so a tie group straddling the
    cut is counted whole; ``coverage=1`` gives the plain accuracy.

    Args:
        probs: ``(..., n, C)`` probabilities.
        labels: ``(..., n)`` true classes.
        coverage: fraction of samples kept, in ``(0, 1]``.

    Returns:
        ``(...)`` selective accuracy per episode (a float for 2-D input).
    """
    if isinstance(coverage, bool) or not isinstance(coverage, numbers.Real) or not 0 < coverage <= 1:
        raise ValueError(f"coverage must be a number in (0, 1], got {coverage!r}")
    probs, labels = _check(probs, labels)
    n = probs.shape[-2]
    # Round first so that e.g. 0.3 · 10 = 3.0000000000000004 keeps 3 samples, not 4.
    kept = min(n, max(1, math.ceil(round(coverage * n, 9))))
    return _value(1.0 - _selective_risks(probs, labels)[..., kept - 1])
