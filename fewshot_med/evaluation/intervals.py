"""95% confidence intervals over episodes (Student-t), for one method and for paired differences.

NaN values (e.g. ``macro_auroc`` of an episode with one class present) are ignored: the mean and
interval use the finite values only, and ``n`` counts only those.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def mean_ci95(values: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """Mean and half-width of its 95% Student-t interval (``n - 1`` degrees of freedom).

    Args:
        values: ``(n,)`` per-episode values; NaNs are ignored.

    Returns:
        ``(mean, half_width)``; the half-width is 0 for one value, and both are NaN for none.
    """
    from scipy.stats import t  # imported here: scipy.stats takes a second to import

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


def summarize(per_episode: Mapping[str, Sequence[float] | np.ndarray]) -> dict[str, tuple[float, float]]:
    """``{metric: (mean, ci95_half_width)}`` over episodes, metrics in the given order.

    Args:
        per_episode: ``{metric: (E,) values}``, one value per episode, the same ``E`` for every metric.
    """
    lengths = {name: len(values) for name, values in per_episode.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"every metric must have one value per episode, got lengths {lengths}")
    return {name: mean_ci95(values) for name, values in per_episode.items()}
