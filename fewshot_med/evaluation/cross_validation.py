"""Cross-validation on a handful of labelled images: folds, out-of-fold logits, and their metrics.

A hospital's own labelled cases are too few to set a test split aside, so every image is scored once
per repeat by a model fitted on the other folds (out-of-fold, "OOF"). Frozen-feature methods fit on
embeddings computed once. The folds come from scikit-learn:

- ``stratified``: ``RepeatedStratifiedKFold`` (Kohavi, "A Study of Cross-Validation and Bootstrap
  for Accuracy Estimation and Model Selection", IJCAI 1995, recommends stratified 10-fold; with few
  images per class the fold count is capped by the smallest class);
- ``stratified_group``: ``StratifiedGroupKFold`` reshuffled per repeat, when patient ids are given,
  so a patient's images never sit on both sides of a fold;
- ``leave_one_patient_out``: ``LeaveOneGroupOut``, when there are fewer patients than folds (it is
  deterministic, so it runs once).

Every training part must hold every class (a few-shot head cannot learn an unseen class); folds that
would not are refused with the class named.

Intervals come from a percentile bootstrap over images, or over patients when patient ids are given
(Efron & Tibshirani, "An Introduction to the Bootstrap", 1993, ch. 13): a resample draws images (or
whole patients) with replacement, each metric is computed on the resampled images of every repeat and
averaged over the repeats. Folds and repeats share images, so an interval over per-fold values would
treat dependent numbers as independent; the bootstrap over the images measures what matters here, the
uncertainty from having few of them.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from fewshot_med.errors import DataError
from fewshot_med.evaluation.metrics import BINNED_METRICS, METRICS, softmax
from fewshot_med.evaluation.selective import risk_coverage_curve
from fewshot_med.methods.base import FewShotMethod

#: Fold schemes, chosen by ``make_folds`` from the data.
FOLD_SCHEMES = ("stratified", "stratified_group", "leave_one_patient_out")
#: Metrics of ``cv_metrics`` besides the per-class recalls (``recall.<class index>``), in report order.
CV_METRICS = ("accuracy", "balanced_accuracy", "macro_auroc", "ece", "nll", "brier")


@dataclass(frozen=True)
class Folds:
    """The train/test splits of a repeated cross-validation.

    Attributes:
        scheme: one of ``FOLD_SCHEMES``.
        n_folds: folds per repeat.
        n_repeats: repeats (1 for leave-one-patient-out).
        fold: ``(n_repeats, n)`` the fold in which each image is out-of-fold, per repeat.
    """

    scheme: str
    n_folds: int
    n_repeats: int
    fold: np.ndarray

    def splits(self) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """``(repeat, train indices, test indices)`` of every fold, repeat by repeat."""
        return [
            (repeat, np.flatnonzero(row != index), np.flatnonzero(row == index))
            for repeat, row in enumerate(self.fold)
            for index in range(self.n_folds)
        ]


def make_folds(
    labels: np.ndarray,
    groups: np.ndarray | None = None,
    n_folds: int = 5,
    n_repeats: int = 3,
    seed: int = 0,
) -> Folds:
    """Repeated stratified folds, grouped by patient when ``groups`` are given (see the module docstring).

    The fold count is capped by the smallest class (``stratified``) or by the fewest patients of a
    class (``stratified_group``), so every class keeps images on the training side of every fold.

    Args:
        labels: ``(n,)`` class indices ``0 … C-1``, every class present.
        groups: ``(n,)`` patient ids, or ``None``.
        n_folds: folds asked for (at least 2).
        n_repeats: repeats with reshuffled folds (at least 1).
        seed: seed of the shuffling.

    Raises:
        DataError: a class with fewer than 2 images (or, grouped, fewer than 2 patients); folds whose
            training part would miss a class.
    """
    from sklearn.model_selection import LeaveOneGroupOut, RepeatedStratifiedKFold, StratifiedGroupKFold

    labels = np.asarray(labels, dtype=np.int64)
    if n_folds < 2 or n_repeats < 1:
        raise ValueError(f"need n_folds ≥ 2 and n_repeats ≥ 1, got {n_folds} and {n_repeats}")
    counts = np.bincount(labels)
    if counts.min() < 2:
        raise DataError(
            f"class {int(counts.argmin())} has {counts.min()} image(s); cross-validation needs at least 2 "
            "labelled images per class"
        )
    n, x = len(labels), np.zeros((len(labels), 1))
    if groups is None:
        k = min(n_folds, int(counts.min()))
        folder = RepeatedStratifiedKFold(n_splits=k, n_repeats=n_repeats, random_state=seed)
        scheme, splits = "stratified", list(folder.split(x, labels))
        n_repeats_done = n_repeats
    else:
        groups = np.asarray(groups).astype(str)
        patients = [len(np.unique(groups[labels == c])) for c in range(len(counts))]
        if min(patients) < 2:
            raise DataError(
                f"class {int(np.argmin(patients))} has images of only one patient; cross-validation grouped "
                "by patient needs every class in at least 2 patients"
            )
        if len(np.unique(groups)) < n_folds:
            scheme, splits = "leave_one_patient_out", list(LeaveOneGroupOut().split(x, labels, groups))
            n_repeats_done = 1
        else:
            scheme, k = "stratified_group", min(n_folds, min(patients))
            splits = []
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
                for repeat in range(n_repeats):
                    folder = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed + repeat)
                    splits += list(folder.split(x, labels, groups))
            n_repeats_done = n_repeats
    per_repeat = len(splits) // n_repeats_done
    fold = np.full((n_repeats_done, n), -1, dtype=np.int64)
    for number, (train, test) in enumerate(splits):
        missing = sorted(set(range(len(counts))) - set(labels[train].tolist()))
        if missing:
            raise DataError(
                f"a {scheme} fold leaves no image of class {missing[0]} to train on: that class's images "
                "come from too few patients; label more patients of it"
            )
        fold[number // per_repeat, test] = number % per_repeat
    return Folds(scheme, per_repeat, n_repeats_done, fold)


def out_of_fold_logits(
    factory: Callable[[], FewShotMethod], features: torch.Tensor, labels: np.ndarray, folds: Folds
) -> np.ndarray:
    """Each image's logits from the method fitted on the other folds, for every repeat.

    Args:
        factory: builds a fresh, unfitted frozen-feature method.
        features: ``(n, D)`` embeddings of the images.
        labels: ``(n,)`` class indices ``0 … C-1``.
        folds: from ``make_folds`` on these labels.

    Returns:
        ``(n_repeats, n, C)`` float64 out-of-fold logits.
    """
    labels_t = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    n_classes = int(labels_t.max()) + 1
    logits = np.full((folds.n_repeats, len(labels_t), n_classes), np.nan)
    for repeat, train, test in folds.splits():
        method = factory().fit(features[train], labels_t[train])
        logits[repeat, test] = method.predict_logits(features[test]).double().numpy()
    return logits


def cross_fitted_temperatures(
    logits: np.ndarray, labels: np.ndarray, folds: Folds, t_min: float = 0.05, t_max: float = 100.0
) -> np.ndarray:
    """For each image and repeat, a temperature fitted on the out-of-fold logits of the *other* folds of
    that repeat, so calibrated metrics never score an image with a temperature it helped fit.

    Args:
        logits: ``(n_repeats, n, C)`` out-of-fold logits.
        labels: ``(n,)`` class indices.
        folds: the folds that produced them.
        t_min: smallest temperature allowed.
        t_max: largest temperature allowed.

    Returns:
        ``(n_repeats, n)`` temperatures; divide ``logits`` by ``[..., None]`` of it.
    """
    from fewshot_med.evaluation._temperature_scaling import TemperatureScaling

    temperatures = np.ones(logits.shape[:2])
    for repeat, train, test in folds.splits():
        scaler = TemperatureScaling(t_min=t_min, t_max=t_max).fit(logits[repeat, train], labels[train])
        temperatures[repeat, test] = scaler.temperature_
    return temperatures


@dataclass(frozen=True)
class Estimate:
    """A metric's value with its 95% percentile-bootstrap interval ``[low, high]``."""

    value: float
    low: float
    high: float

    @property
    def half_width(self) -> float:
        """``(high - low) / 2``, the toolkit's ``_ci95`` convention."""
        return (self.high - self.low) / 2


def recall_per_class(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``(..., C)`` recall of each class (NaN for a class without images) from ``(..., n, C)``
    probabilities and ``(..., n)`` labels."""
    n_classes = probs.shape[-1]
    truth = labels[..., None] == np.arange(n_classes)
    hits = truth & (probs.argmax(axis=-1)[..., None] == np.arange(n_classes))
    with np.errstate(invalid="ignore", divide="ignore"):
        return hits.sum(axis=-2) / truth.sum(axis=-2)


def _metric_values(probs: np.ndarray, labels: np.ndarray, n_bins: int) -> np.ndarray:
    """``CV_METRICS`` then the per-class recalls of ``(R, m, C)`` probabilities and ``(m,)`` labels,
    each averaged over the ``R`` repeats."""
    repeated = np.broadcast_to(labels, probs.shape[:-1])
    per_repeat = [
        METRICS[name](probs, repeated, n_bins) if name in BINNED_METRICS else METRICS[name](probs, repeated)
        for name in CV_METRICS
    ]
    recalls = np.nanmean(recall_per_class(probs, repeated), axis=0)
    return np.concatenate([[np.nanmean(values) for values in per_repeat], recalls])


def _resampler(labels: np.ndarray, groups: np.ndarray | None, seed: int) -> Callable[[], np.ndarray]:
    """Draws the row indices of one bootstrap resample: ``n`` images, or as many whole patients as
    there are, with replacement."""
    rng = np.random.default_rng(seed)
    if groups is None:
        return lambda: rng.integers(len(labels), size=len(labels))
    _, patient = np.unique(np.asarray(groups).astype(str), return_inverse=True)
    members = [np.flatnonzero(patient == index) for index in range(patient.max() + 1)]
    return lambda: np.concatenate([members[i] for i in rng.integers(len(members), size=len(members))])


def cv_metrics(
    probs: np.ndarray,
    labels: np.ndarray,
    groups: np.ndarray | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    n_bins: int = 15,
) -> dict[str, Estimate]:
    """Metrics of out-of-fold predictions with 95% bootstrap intervals (see the module docstring).

    A metric's value is its mean over the repeats, each repeat scoring every image once; ECE is pooled
    over the images of a repeat. ``recall.<c>`` is class ``c``'s recall.

    Args:
        probs: ``(n_repeats, n, C)`` out-of-fold probabilities.
        labels: ``(n,)`` class indices.
        groups: ``(n,)`` patient ids (whole patients are resampled), or ``None`` (images are).
        n_boot: bootstrap resamples.
        seed: seed of the resampling.
        n_bins: equal-width bins of ECE.

    Returns:
        ``{metric: Estimate}`` for ``CV_METRICS`` and ``recall.<c>`` for every class ``c``.
    """
    labels = np.asarray(labels, dtype=np.int64)
    names = [*CV_METRICS, *(f"recall.{c}" for c in range(probs.shape[-1]))]
    draw = _resampler(labels, groups, seed)
    resampled = np.empty((n_boot, len(names)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a resample may miss a class: NaN, left out
        for b in range(n_boot):
            rows = draw()
            resampled[b] = _metric_values(probs[:, rows], labels[rows], n_bins)
        low, high = np.nanpercentile(resampled, [2.5, 97.5], axis=0)
        values = _metric_values(probs, labels, n_bins)
    return {
        name: Estimate(float(value), float(lo), float(hi))
        for name, value, lo, hi in zip(names, values, low, high, strict=True)
    }


def confusion_counts(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``(C, C)`` counts, true class in rows, of the out-of-fold predictions of every repeat together
    (each image counted once per repeat), from ``(n_repeats, n, C)`` probabilities."""
    from sklearn.metrics import confusion_matrix

    n_repeats, _, n_classes = probs.shape
    return confusion_matrix(
        np.tile(labels, n_repeats), probs.argmax(axis=-1).ravel(), labels=np.arange(n_classes)
    )


def abstention_threshold(
    probs: np.ndarray, labels: np.ndarray, coverage: float | None = None, accuracy: float | None = None
) -> tuple[float | None, float, float]:
    """The top-label probability below which to abstain, from out-of-fold predictions.

    Exactly one target: ``coverage``, the fraction of predictions to keep (the threshold is the
    confidence of the ``ceil(coverage · N)``-th most confident one, so at least that fraction has a
    confidence ≥ it), or ``accuracy``, the selective accuracy to reach (the largest coverage of the
    risk-coverage curve, Geifman & El-Yaniv 2017, whose accuracy is at least ``accuracy``; tied
    confidences enter together, as in ``selective.risk_coverage_curve``).

    Args:
        probs: ``(n_repeats, n, C)`` calibrated out-of-fold probabilities; the repeats are pooled
            (``N = n_repeats · n`` predictions).
        labels: ``(n,)`` class indices.
        coverage: target coverage in ``(0, 1]``.
        accuracy: target selective accuracy in ``(0, 1]``.

    Returns:
        ``(threshold, coverage, selective accuracy)`` on these predictions: keep a prediction when its
        top probability is ≥ ``threshold``. ``threshold`` is ``None`` when nothing is abstained on:
        coverage 1, or no coverage reaches ``accuracy`` (the accuracy returned is then below it).
    """
    if (coverage is None) == (accuracy is None):
        raise ValueError("give exactly one of coverage and accuracy")
    probs, labels = probs.reshape(-1, probs.shape[-1]), np.tile(labels, probs.shape[0])
    confidence, correct = probs.max(axis=-1), probs.argmax(axis=-1) == labels
    ordered = np.sort(confidence)[::-1]
    if coverage is not None:
        kept = min(len(ordered), max(1, math.ceil(round(coverage * len(ordered), 9))))
    else:
        _, risk = risk_coverage_curve(probs, labels)
        reaching = np.flatnonzero(1 - risk >= accuracy - 1e-12)
        kept = int(reaching[-1]) + 1 if len(reaching) else len(ordered)
    accepted = confidence >= ordered[kept - 1]
    if accepted.all():
        return None, 1.0, float(correct.mean())
    return float(ordered[kept - 1]), float(accepted.mean()), float(correct[accepted].mean())


def calibrated_probs(logits: np.ndarray, temperature: float | np.ndarray) -> np.ndarray:
    """``softmax(logits / temperature)`` over the last axis; ``temperature`` a number or an array that
    broadcasts against ``logits[..., 0]``."""
    return softmax(np.asarray(logits) / np.asarray(temperature)[..., None])
