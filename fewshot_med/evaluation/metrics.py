"""Per-episode metrics of predicted class probabilities: discrimination and calibration.

Every metric takes ``probs`` ``(..., n, C)`` (rows sum to 1) and ``labels`` ``(..., n)`` in
``0 … C-1``; leading axes are episodes, so one call scores a whole episode list without a Python
loop. It returns one value per episode: an array of shape ``(...)``, or a float for 2-D input.
``METRICS`` lists them in reporting order (the selective-prediction AURC of ``selective`` among
them); ``metrics_from_probs`` applies all of them.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from fewshot_med.evaluation.selective import aurc

Value = float | np.ndarray


def _check(probs: np.ndarray, labels: np.ndarray) -> None:
    if probs.ndim < 2 or labels.shape != probs.shape[:-1] or probs.shape[-2] == 0:
        raise ValueError(
            f"probs {probs.shape} and labels {labels.shape} must be (..., n, C) and (..., n) with n ≥ 1"
        )


def _value(values: np.ndarray) -> Value:
    """A float for one episode (0-d), else the ``(...)`` array."""
    return float(values) if values.ndim == 0 else values


def _one_hot(labels: np.ndarray, n_classes: int) -> np.ndarray:
    return (labels[..., None] == np.arange(n_classes)).astype(np.float64)


def accuracy(probs: np.ndarray, labels: np.ndarray) -> Value:
    """Fraction of samples whose most probable class is the true class."""
    _check(probs, labels)
    return _value(np.mean(probs.argmax(axis=-1) == labels, axis=-1))


def balanced_accuracy(probs: np.ndarray, labels: np.ndarray) -> Value:
    """Mean recall over the classes present in ``labels`` (absent classes have no recall)."""
    _check(probs, labels)
    n_classes = probs.shape[-1]
    truth = _one_hot(labels, n_classes)
    hits = truth * _one_hot(probs.argmax(axis=-1), n_classes)
    counts = truth.sum(axis=-2)  # (..., C)
    recall = hits.sum(axis=-2) / np.maximum(counts, 1)
    present = counts > 0
    return _value((recall * present).sum(axis=-1) / present.sum(axis=-1))


def macro_auroc(probs: np.ndarray, labels: np.ndarray) -> Value:
    """One-vs-rest AUROC averaged over classes (scikit-learn's ``ovr``/``macro``; plain AUROC for 2 classes).

    Each class present in ``labels`` is scored by its own probability column, with the Mann-Whitney
    statistic (ties count one half). Classes absent from ``labels`` are skipped; NaN when fewer than
    two classes are present, since no class then has negatives.
    """
    from scipy.stats import rankdata  # imported here: scipy.stats takes a second to import

    _check(probs, labels)
    n = probs.shape[-2]
    truth = _one_hot(labels, probs.shape[-1])
    ranks = rankdata(probs, axis=-2)  # per episode and column, ties get their mean rank
    n_pos = truth.sum(axis=-2)
    n_neg = n - n_pos
    scored = (n_pos > 0) & (n_neg > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        aurocs = ((ranks * truth).sum(axis=-2) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
        mean = np.where(scored, aurocs, 0.0).sum(axis=-1) / scored.sum(axis=-1)
    return _value(np.where(scored.sum(axis=-1) >= 2, mean, np.nan))


def _bin_gaps(
    scores: np.ndarray, hits: np.ndarray, bins: np.ndarray, n_bins: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per bin: ``(sizes, |Σ hits - Σ scores|)``, each ``(..., n_bins)``, from ``(..., n)`` inputs."""
    batch = scores.shape[:-1]
    offsets = np.arange(int(np.prod(batch))).reshape(*batch, 1) * n_bins
    flat = (bins + offsets).ravel()
    length = int(np.prod(batch)) * n_bins
    sizes = np.bincount(flat, minlength=length).reshape(*batch, n_bins)
    hit_sums = np.bincount(flat, weights=hits.ravel(), minlength=length)
    score_sums = np.bincount(flat, weights=scores.ravel(), minlength=length)
    return sizes, np.abs(hit_sums - score_sums).reshape(*batch, n_bins)


def _equal_width_bins(scores: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin of each score among ``n_bins`` equal-width intervals ``(lo, hi]`` of ``[0, 1]``
    (a score of exactly 0 goes into the first bin)."""
    return np.searchsorted(np.linspace(0.0, 1.0, n_bins + 1)[1:-1], scores, side="left")


def _top_label(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(confidence, correct)``, each ``(..., n)``: the top probability and whether it is right."""
    return probs.max(axis=-1), (probs.argmax(axis=-1) == labels).astype(np.float64)


def ece(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> Value:
    """Expected calibration error of the top label (Guo, Pleiss, Sun & Weinberger, "On Calibration of
    Modern Neural Networks", ICML 2017): the bin-size-weighted mean of ``|accuracy - confidence|`` over
    ``n_bins`` equal-width confidence bins ``(lo, hi]``."""
    _check(probs, labels)
    confidence, correct = _top_label(probs, labels)
    _, gaps = _bin_gaps(confidence, correct, _equal_width_bins(confidence, n_bins), n_bins)
    return _value(gaps.sum(axis=-1) / confidence.shape[-1])


def adaptive_ece(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> Value:
    """ECE over equal-mass bins (Nixon, Dusenberry, Zhang, Jerfel & Tran, "Measuring Calibration in
    Deep Learning", CVPR Workshops 2019): samples sorted by top-label confidence fill ``n_bins`` bins
    of equal count (sizes differ by at most one; with fewer samples than bins, one sample a bin).
    Tied confidences share the bin of the first of them, so the result does not depend on their order."""
    from scipy.stats import rankdata  # imported here: scipy.stats takes a second to import

    _check(probs, labels)
    confidence, correct = _top_label(probs, labels)
    n = confidence.shape[-1]
    first_rank = rankdata(confidence, method="min", axis=-1).astype(np.int64) - 1
    bins = first_rank * min(n_bins, n) // n
    _, gaps = _bin_gaps(confidence, correct, bins, n_bins)
    return _value(gaps.sum(axis=-1) / n)


def classwise_ece(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> Value:
    """Class-wise ECE (Kull, Perello-Nieto, Kängsepp, Silva Filho, Song & Flach, "Beyond temperature
    scaling: Obtaining well-calibrated multiclass probabilities with Dirichlet calibration", NeurIPS
    2019): for every class, the ECE of its probability column against the event "label is this
    class" over equal-width bins; then the mean over classes."""
    _check(probs, labels)
    columns = np.moveaxis(probs, -1, -2)  # (..., C, n)
    events = np.moveaxis(_one_hot(labels, probs.shape[-1]), -1, -2)
    _, gaps = _bin_gaps(columns, events, _equal_width_bins(columns, n_bins), n_bins)
    return _value((gaps.sum(axis=-1) / probs.shape[-2]).mean(axis=-1))


def mce(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> Value:
    """Maximum calibration error (Guo et al., 2017): the largest ``|accuracy - confidence|`` over the
    non-empty bins used by ``ece``."""
    _check(probs, labels)
    confidence, correct = _top_label(probs, labels)
    sizes, gaps = _bin_gaps(confidence, correct, _equal_width_bins(confidence, n_bins), n_bins)
    return _value(np.max(gaps / np.maximum(sizes, 1), axis=-1))


def brier(probs: np.ndarray, labels: np.ndarray) -> Value:
    """Multi-class Brier score (Brier, 1950): mean over samples of the summed squared error against the
    one-hot label, in ``[0, 2]``. For 2 classes it is twice the binary score of scikit-learn."""
    _check(probs, labels)
    return _value(np.mean(np.sum((probs - _one_hot(labels, probs.shape[-1])) ** 2, axis=-1), axis=-1))


def nll(probs: np.ndarray, labels: np.ndarray) -> Value:
    """Mean negative log probability of the true class, probabilities clipped below at ``1e-12``."""
    _check(probs, labels)
    true_class = np.take_along_axis(probs, labels[..., None], axis=-1)[..., 0]
    return _value(-np.mean(np.log(np.maximum(true_class, 1e-12)), axis=-1))


METRICS: dict[str, Callable[[np.ndarray, np.ndarray], Value]] = {
    "accuracy": accuracy,
    "balanced_accuracy": balanced_accuracy,
    "macro_auroc": macro_auroc,
    "ece": ece,
    "adaptive_ece": adaptive_ece,
    "classwise_ece": classwise_ece,
    "mce": mce,
    "brier": brier,
    "nll": nll,
    "aurc": aurc,
}


def pooled_ece(
    probs: np.ndarray, labels: np.ndarray, n_bins: int = 15, n_boot: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """ECE of all episodes' samples pooled, with a 95% bootstrap interval over episodes.

    Per-episode ECE is biased upwards by the few samples of an episode (45 queries in 15 bins show
    gaps of about 0.1 even when perfectly calibrated), so the pooled ECE, computed once on every query
    of every episode as in Guo et al. (2017), is the calibration figure to compare across methods and
    papers. Episodes are resampled with replacement (``n_boot`` times, from ``seed``); since ECE only
    needs per-bin sums, each resample is one matrix product over per-episode bin sums.

    Args:
        probs: ``(E, n, C)`` probabilities of ``E`` episodes.
        labels: ``(E, n)`` true classes.
        n_bins: equal-width confidence bins.
        n_boot: bootstrap resamples.
        seed: seed of the resampling.

    Returns:
        ``(pooled ECE, half-width of the 2.5-97.5 percentile interval)``.
    """
    _check(probs, labels)
    if probs.ndim != 3:
        raise ValueError(f"pooled_ece needs (E, n, C) episodes, got {probs.shape}")
    confidence, correct = _top_label(probs, labels)
    bins = _equal_width_bins(confidence, n_bins)
    offsets = np.arange(len(bins))[:, None] * n_bins
    length = len(bins) * n_bins
    hit_sums = np.bincount((bins + offsets).ravel(), weights=correct.ravel(), minlength=length)
    score_sums = np.bincount((bins + offsets).ravel(), weights=confidence.ravel(), minlength=length)
    gaps = (hit_sums - score_sums).reshape(len(bins), n_bins)  # (E, n_bins) signed per-episode sums
    n_total = confidence.size
    value = float(np.abs(gaps.sum(axis=0)).sum() / n_total)
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(len(bins), np.full(len(bins), 1 / len(bins)), size=n_boot)  # (B, E)
    resampled = np.abs(weights @ gaps).sum(axis=1) / n_total
    low, high = np.percentile(resampled, [2.5, 97.5])
    return value, float((high - low) / 2)


def softmax(logits: torch.Tensor | np.ndarray) -> np.ndarray:
    """Numerically stable softmax over the last axis.

    Args:
        logits: ``(..., C)``, a tensor on any device or an array.

    Returns:
        ``(..., C)`` float64 probabilities.
    """
    if isinstance(logits, torch.Tensor):
        logits = logits.detach().cpu().double().numpy()
    shifted = np.asarray(logits, dtype=np.float64)
    shifted = shifted - shifted.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


#: metrics computed over confidence bins; ``metrics_from_probs`` passes them its ``n_bins``
BINNED_METRICS = ("ece", "adaptive_ece", "classwise_ece", "mce")


def metrics_from_probs(
    probs: np.ndarray, labels: np.ndarray | torch.Tensor, n_bins: int = 15
) -> dict[str, Value]:
    """All ``METRICS`` of ``(..., n, C)`` probabilities against ``(..., n)`` labels, in registry order;
    the ``BINNED_METRICS`` use ``n_bins`` bins."""
    labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels, dtype=np.int64)
    return {
        name: metric(probs, labels, n_bins) if name in BINNED_METRICS else metric(probs, labels)
        for name, metric in METRICS.items()
    }
