"""95% confidence intervals over episodes (Student-t), for one method and for paired differences.

NaN values (e.g. ``macro_auroc`` of an episode with one class present) are ignored: the mean and
interval use the finite values only, and ``n`` counts only those.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.stats import t


def mean_ci95(values: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """Mean and half-width of its 95% Student-t interval (``n - 1`` degrees of freedom).

    Args:
        values: ``(n,)`` per-episode values; NaNs are ignored.

    Returns:
        ``(mean, half_width)``; the half-width is 0 for one value, and both are NaN for none.
    """
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[~np.isnan(finite)]
    n = len(finite)
    if n == 0:
        return float("nan"), float("nan")
    if n == 1:
        return float(finite[0]), 0.0
    half_width = t.ppf(0.975, n - 1) * finite.std(ddof=1) / np.sqrt(n)
    return float(finite.mean()), float(half_width)


def paired_difference_ci95(
    a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray
) -> tuple[float, float]:
    """Mean of ``a - b`` and its 95% half-width, pairing values of the same episodes.

    Pairing removes the episode-to-episode variation both methods share, so the interval is much
    narrower than one built from the two separate intervals. Pairs with a NaN are ignored.

    Args:
        a: ``(n,)`` per-episode values of one method.
        b: ``(n,)`` values of the other method on the same episodes, in the same order.

    Returns:
        ``(mean_difference, half_width)``.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired values must be two (n,) arrays of the same episodes: {a.shape}, {b.shape}")
    return mean_ci95(a - b)


def summarize(per_episode: Sequence[dict[str, float]]) -> dict[str, tuple[float, float]]:
    """``{metric: (mean, ci95_half_width)}`` over episodes, metrics in the order of the first episode.

    Args:
        per_episode: one ``{metric: value}`` dict per episode, all with the same metrics.
    """
    if not per_episode:
        return {}
    names = list(per_episode[0])
    if any(list(values) != names for values in per_episode):
        raise ValueError(f"every episode must report the same metrics {names}")
    return {name: mean_ci95([values[name] for values in per_episode]) for name in names}
