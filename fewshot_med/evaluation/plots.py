"""Report figures: reliability diagrams, confusion matrices, risk-coverage and accuracy-vs-shots plots.

Every figure is built on ``matplotlib.figure.Figure`` with the object API, never through ``pyplot``,
so building figures is thread-safe, needs no display, and leaves no global state behind. Each builder
returns the ``Figure``; ``save_figure`` writes it as a PNG and releases it.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from fewshot_med.evaluation.metrics import ece

_ACCURACY_COLOR = "#1f77b4"
_GAP_COLOR = "#d62728"


def save_figure(figure: Figure, path: str | os.PathLike[str]) -> Path:
    """Write ``figure`` as a PNG (120 dpi, tight bounding box) and close it.

    The file is written to a temporary name and renamed, so a reader never sees half a PNG. The
    figure is cleared afterwards (and closed in ``pyplot`` if it was made there): do not reuse it.

    Args:
        figure: the figure to write.
        path: destination; missing parent folders are created.

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(temporary, "xb") as stream:  # unlike mkstemp, keeps the usual (umask) permissions
            figure.savefig(stream, format="png", dpi=120, bbox_inches="tight")
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    finally:
        pyplot = sys.modules.get("matplotlib.pyplot")
        if pyplot is not None:  # only a pyplot-made figure is registered there
            pyplot.close(figure)
        figure.clear()
    return path


def _check_probs(probs: np.ndarray, labels: np.ndarray, name: str = "probs") -> tuple[np.ndarray, np.ndarray]:
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels)
    if probs.ndim != 2 or labels.shape != (probs.shape[0],) or probs.shape[0] == 0:
        raise ValueError(f"{name} {probs.shape} and labels {labels.shape} must be (n, C) and (n,) with n ≥ 1")
    return probs, labels.astype(np.int64, copy=False)


def _reliability_bins(
    probs: np.ndarray, labels: np.ndarray, n_bins: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per equal-width bin ``(lo, hi]`` of top-label confidence, binned like ``metrics.ece``.

    Returns:
        ``(edges (n_bins + 1,), sizes (n_bins,), accuracy (n_bins,), mean confidence (n_bins,))``;
        accuracy and confidence are NaN in empty bins.
    """
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.searchsorted(edges[1:-1], confidence, side="left")
    sizes = np.bincount(bins, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = np.bincount(bins, weights=correct, minlength=n_bins) / sizes
        mean_confidence = np.bincount(bins, weights=confidence, minlength=n_bins) / sizes
    return edges, sizes, accuracy, mean_confidence


def _draw_reliability(
    top: Axes, bottom: Axes, probs: np.ndarray, labels: np.ndarray, n_bins: int, heading: str
) -> None:
    edges, sizes, accuracy, confidence = _reliability_bins(probs, labels, n_bins)
    width = edges[1] - edges[0]
    filled = sizes > 0
    left = edges[:-1][filled]
    top.bar(
        left,
        accuracy[filled],
        width=width,
        align="edge",
        color=_ACCURACY_COLOR,
        edgecolor="black",
        linewidth=0.6,
        label="Accuracy",
    )
    gap_bottom = np.minimum(accuracy[filled], confidence[filled])
    gap = np.abs(accuracy[filled] - confidence[filled])
    top.bar(
        left,
        gap,
        bottom=gap_bottom,
        width=width,
        align="edge",
        color=_GAP_COLOR,
        alpha=0.3,
        edgecolor=_GAP_COLOR,
        hatch="//",
        linewidth=0.6,
        label="Gap to confidence",
    )
    top.plot([0, 1], [0, 1], linestyle="--", color="gray", linewidth=1, label="Perfect calibration")
    top.text(
        0.04,
        0.96,
        f"ECE = {100 * float(ece(probs, labels, n_bins=n_bins)):.2f}%",
        transform=top.transAxes,
        va="top",
        ha="left",
        bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.8},
    )
    top.set(xlim=(0, 1), ylim=(0, 1), ylabel="Accuracy", title=heading)
    top.legend(loc="lower right", fontsize="small")
    top.tick_params(labelbottom=False)

    bottom.bar(edges[:-1], sizes, width=width, align="edge", color="gray", edgecolor="black", linewidth=0.6)
    mean_confidence = probs.max(axis=1).mean()
    mean_accuracy = np.mean(probs.argmax(axis=1) == labels)
    bottom.axvline(mean_accuracy, color=_ACCURACY_COLOR, linestyle="-", linewidth=1.2, label="Accuracy")
    bottom.axvline(mean_confidence, color=_GAP_COLOR, linestyle="--", linewidth=1.2, label="Mean confidence")
    bottom.set(xlim=(0, 1), xlabel="Top-label confidence", ylabel="Samples")
    bottom.legend(loc="upper left", fontsize="x-small")


def reliability_diagram(
    probs: np.ndarray,
    labels: np.ndarray,
    *,
    calibrated_probs: np.ndarray | None = None,
    n_bins: int = 15,
    title: str = "",
) -> Figure:
    """Top-label reliability diagram (Guo et al., 2017, "On Calibration of Modern Neural Networks").

    Per equal-width confidence bin ``(lo, hi]`` (the bins of ``metrics.ece``) a bar shows the
    accuracy, against the diagonal of perfect calibration, with the gap to the bin's mean confidence
    shaded; empty bins have no bar. Below, a histogram counts the samples per bin. With
    ``calibrated_probs`` there are two columns, before and after calibration, each with its ECE.

    Args:
        probs: ``(n, C)`` probabilities, all episodes' queries pooled.
        labels: ``(n,)`` true classes.
        calibrated_probs: ``(n, C)`` probabilities of the same samples after calibration.
        n_bins: number of confidence bins.
        title: figure title.

    Returns:
        The figure: 2 axes (reliability, histogram), or 4 with ``calibrated_probs``.
    """
    probs, labels = _check_probs(probs, labels)
    panels = [(probs, "Before calibration" if calibrated_probs is not None else "")]
    if calibrated_probs is not None:
        calibrated_probs, _ = _check_probs(calibrated_probs, labels, "calibrated_probs")
        if calibrated_probs.shape != probs.shape:
            raise ValueError(f"calibrated_probs {calibrated_probs.shape} must match probs {probs.shape}")
        panels.append((calibrated_probs, "After calibration"))
    if n_bins < 1:
        raise ValueError(f"n_bins must be ≥ 1, got {n_bins}")

    figure = Figure(figsize=(4.5 * len(panels), 6.0), layout="constrained")
    axes = figure.subplots(2, len(panels), squeeze=False, sharex="col", gridspec_kw={"height_ratios": [3, 1]})
    for column, (panel_probs, heading) in enumerate(panels):
        _draw_reliability(axes[0, column], axes[1, column], panel_probs, labels, n_bins, heading)
    if title:
        figure.suptitle(title)
    return figure


def confusion_matrix_figure(
    labels: np.ndarray,
    predicted: np.ndarray,
    class_names: Sequence[str],
    *,
    normalize: bool = True,
    title: str = "",
) -> Figure:
    """Confusion-matrix heat map: true class in rows, predicted class in columns.

    With ``normalize`` each row is divided by its count, so the diagonal is the per-class recall, and
    cells show the percentage above the count; classes without samples have an empty row.

    Args:
        labels: ``(n,)`` true classes in ``0 … len(class_names) - 1``.
        predicted: ``(n,)`` predicted classes, same range.
        class_names: one name per class (e.g. 3 novel, or 7 base + novel in the generalised setting).
        normalize: colour by row fraction (recall) rather than by count.
        title: axes title.

    Returns:
        The figure: the heat map and its colour bar.
    """
    labels, predicted = np.asarray(labels), np.asarray(predicted)
    n_classes = len(class_names)
    if labels.ndim != 1 or predicted.shape != labels.shape or n_classes == 0:
        raise ValueError(f"labels {labels.shape} and predicted {predicted.shape} must both be (n,)")
    for name, values in (("labels", labels), ("predicted", predicted)):
        if values.size and (values.min() < 0 or values.max() >= n_classes):
            raise ValueError(f"{name} must lie in 0 … {n_classes - 1} (one per class name)")
    counts = np.bincount(
        labels.astype(np.int64) * n_classes + predicted.astype(np.int64), minlength=n_classes**2
    ).reshape(n_classes, n_classes)
    row_sums = counts.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        fractions = np.where(row_sums > 0, counts / row_sums, np.nan)
    shown = fractions if normalize else counts.astype(np.float64)

    size = max(4.0, 0.75 * n_classes + 2.5)
    figure = Figure(figsize=(size + 1.0, size), layout="constrained")
    ax = figure.add_subplot()
    image = ax.imshow(shown, cmap="Blues", vmin=0, vmax=1 if normalize else max(1, counts.max()))
    figure.colorbar(image, ax=ax, label="Row fraction (recall)" if normalize else "Samples")
    font_size = 9 if n_classes <= 5 else 7
    threshold = 0.5 * (1 if normalize else max(1, counts.max()))
    for row in range(n_classes):
        for column in range(n_classes):
            if row_sums[row, 0] == 0:
                continue
            text = (
                f"{100 * fractions[row, column]:.0f}%\n({counts[row, column]})"
                if normalize
                else (f"{counts[row, column]}")
            )
            color = "white" if shown[row, column] > threshold else "black"
            ax.text(column, row, text, ha="center", va="center", color=color, fontsize=font_size)
    ticks = np.arange(n_classes)
    ax.set_xticks(
        ticks,
        list(class_names),
        rotation=45 if n_classes > 4 else 0,
        ha="right" if n_classes > 4 else "center",
    )
    ax.set_yticks(ticks, list(class_names))
    ax.set(xlabel="Predicted class", ylabel="True class", title=title)
    return figure


def risk_coverage_figure(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], title: str = "") -> Figure:
    """Risk-coverage curves of several methods (Geifman & El-Yaniv, 2017), AURC in the legend.

    Args:
        curves: ``{method: (coverage (n,), risk (n,))}``, e.g. from ``selective.risk_coverage_curve``;
            the AURC shown is the mean risk over the coverage points (``selective.aurc``).
        title: axes title.

    Returns:
        The figure: one axes, one line per method.
    """
    if not curves:
        raise ValueError("curves must hold at least one method")
    figure = Figure(figsize=(5.5, 4.0), layout="constrained")
    ax = figure.add_subplot()
    for method, (coverage, risk) in curves.items():
        coverage, risk = np.asarray(coverage, dtype=np.float64), np.asarray(risk, dtype=np.float64)
        if coverage.ndim != 1 or risk.shape != coverage.shape or coverage.size == 0:
            raise ValueError(
                f"curve {method!r}: coverage {coverage.shape} and risk {risk.shape} must be (n,)"
            )
        ax.plot(coverage, risk, linewidth=1.5, label=f"{method} (AURC {risk.mean():.3f})")
    ax.set(xlim=(0, 1), xlabel="Coverage", ylabel="Risk (error rate)", title=title)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return figure


def accuracy_vs_shots_figure(
    rows: Sequence[tuple[str, int, float, float]], *, metric: str = "accuracy", title: str = ""
) -> Figure:
    """A metric against the number of shots K, one line per method with its 95% CI as a band.

    Args:
        rows: ``(method, K, mean, ci95_half_width)`` per method and K, in any order; methods are
            drawn in order of first appearance, each over increasing K. A NaN half-width has no band.
        metric: metric name for the y axis.
        title: axes title.

    Returns:
        The figure: one axes, one line per method.
    """
    if not rows:
        raise ValueError("rows must hold at least one (method, K, mean, ci95_half_width)")
    by_method: dict[str, list[tuple[int, float, float]]] = {}
    for method, shots, mean, half_width in rows:
        by_method.setdefault(method, []).append((int(shots), float(mean), float(half_width)))
    figure = Figure(figsize=(5.5, 4.0), layout="constrained")
    ax = figure.add_subplot()
    for method, points in by_method.items():
        shots, mean, half_width = (np.array(column) for column in zip(*sorted(points), strict=True))
        (line,) = ax.plot(shots, mean, marker="o", linewidth=1.5, label=method)
        ax.fill_between(
            shots, mean - half_width, mean + half_width, color=line.get_color(), alpha=0.2, linewidth=0
        )
    ax.set_xticks(sorted({int(row[1]) for row in rows}))
    ax.set(xlabel="Shots per class (K)", ylabel=metric.replace("_", " "), title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return figure
