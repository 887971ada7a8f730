import numpy as np
import pytest
from matplotlib.figure import Figure

from fewshot_med.evaluation.metrics import ece
from fewshot_med.evaluation.plots import (
    accuracy_vs_shots_figure,
    confusion_matrix_figure,
    reliability_diagram,
    risk_coverage_figure,
    save_figure,
)
from fewshot_med.evaluation.selective import risk_coverage_curve

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _random_task(n=90, n_classes=3, seed=0):
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.full(n_classes, 0.5), size=n)
    labels = np.where(rng.random(n) < 0.7, probs.argmax(axis=1), rng.integers(0, n_classes, n))
    return probs, labels


def _assert_png(figure, path):
    written = save_figure(figure, path)
    assert written == path
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 1000
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind
    assert not figure.axes  # released
    reference = path.parent.parent / f"{path.name}.reference"
    reference.write_bytes(b"")
    assert path.stat().st_mode == reference.stat().st_mode  # ordinary permissions, not mkstemp's 0600


def _container(ax, label):
    (container,) = [c for c in ax.containers if c.get_label() == label]
    return container


def test_reliability_bars_are_per_bin_accuracies_by_hand(tmp_path):
    # 5 bins (0.2 wide). Bin (0.4, 0.6]: 0.55 right, 0.58 wrong -> 1/2. Bin (0.6, 0.8]: 0.65 right,
    # 0.7 right, 0.75 wrong -> 2/3. Bin (0.8, 1]: 0.95 wrong -> 0. Bins below 0.4 are empty.
    confidence = np.array([0.55, 0.58, 0.65, 0.7, 0.75, 0.95])
    probs = np.stack([confidence, 1 - confidence], axis=1)
    labels = np.array([0, 1, 0, 0, 1, 1])
    figure = reliability_diagram(probs, labels, n_bins=5, title="tiny")
    assert isinstance(figure, Figure)
    top, bottom = figure.axes
    bars = _container(top, "Accuracy")
    np.testing.assert_allclose([bar.get_height() for bar in bars], [1 / 2, 2 / 3, 0.0])
    np.testing.assert_allclose([bar.get_x() for bar in bars], [0.4, 0.6, 0.8])
    gaps = _container(top, "Gap to confidence")
    np.testing.assert_allclose([bar.get_height() for bar in gaps], [0.065, 0.7 - 2 / 3, 0.95])
    (histogram,) = bottom.containers
    np.testing.assert_allclose([bar.get_height() for bar in histogram], [0, 0, 2, 3, 1])
    assert f"ECE = {100 * ece(probs, labels, n_bins=5):.2f}%" in [t.get_text() for t in top.texts]
    _assert_png(figure, tmp_path / "reliability.png")


def test_reliability_before_and_after_calibration(tmp_path):
    probs, labels = _random_task()
    calibrated = probs**0.5 / (probs**0.5).sum(axis=1, keepdims=True)
    figure = reliability_diagram(probs, labels, calibrated_probs=calibrated)
    assert len(figure.axes) == 4
    titles = [ax.get_title() for ax in figure.axes]
    assert "Before calibration" in titles and "After calibration" in titles
    texts = [t.get_text() for ax in figure.axes for t in ax.texts]
    for panel in (probs, calibrated):
        assert f"ECE = {100 * ece(panel, labels):.2f}%" in texts
    _assert_png(figure, tmp_path / "nested" / "calibration.png")


def test_reliability_validation():
    probs, labels = _random_task()
    with pytest.raises(ValueError, match="calibrated_probs"):
        reliability_diagram(probs, labels, calibrated_probs=probs[:10])
    with pytest.raises(ValueError, match="must be"):
        reliability_diagram(probs, labels[:-1])


@pytest.mark.parametrize("n_classes", [3, 7])
def test_confusion_matrix(tmp_path, n_classes):
    rng = np.random.default_rng(n_classes)
    labels = np.concatenate([np.arange(n_classes), rng.integers(0, n_classes, 60)])
    predicted = np.where(rng.random(len(labels)) < 0.6, labels, rng.integers(0, n_classes, len(labels)))
    names = [f"class{i}" for i in range(n_classes)]
    figure = confusion_matrix_figure(labels, predicted, names, title="cm")
    heat, _colorbar = figure.axes
    counts = np.zeros((n_classes, n_classes))
    np.add.at(counts, (labels, predicted), 1)
    np.testing.assert_allclose(heat.images[0].get_array(), counts / counts.sum(axis=1, keepdims=True))
    assert len(heat.texts) == n_classes**2
    assert [t.get_text() for t in heat.get_yticklabels()] == names
    _assert_png(figure, tmp_path / f"cm{n_classes}.png")


def test_confusion_matrix_counts_and_empty_row():
    labels, predicted = np.array([0, 0, 0, 2]), np.array([0, 2, 0, 2])
    figure = confusion_matrix_figure(labels, predicted, ["a", "b", "c"])
    texts = [t.get_text() for t in figure.axes[0].texts]
    assert "67%\n(2)" in texts and "100%\n(1)" in texts
    assert len(texts) == 6  # the row of class b, which has no samples, stays blank
    counts_figure = confusion_matrix_figure(labels, predicted, ["a", "b", "c"], normalize=False)
    np.testing.assert_array_equal(
        counts_figure.axes[0].images[0].get_array(), [[2, 0, 1], [0, 0, 0], [0, 0, 1]]
    )
    with pytest.raises(ValueError, match="predicted"):
        confusion_matrix_figure(labels, np.array([0, 0, 0, 3]), ["a", "b", "c"])


def test_risk_coverage_figure(tmp_path):
    curves = {}
    for seed, method in enumerate(["protonet", "simpleshot"]):
        probs, labels = _random_task(seed=seed)
        curves[method] = risk_coverage_curve(probs, labels)
    figure = risk_coverage_figure(curves, title="risk")
    (ax,) = figure.axes
    assert len(ax.lines) == 2
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == [f"{m} (AURC {curves[m][1].mean():.3f})" for m in curves]
    _assert_png(figure, tmp_path / "risk.png")
    with pytest.raises(ValueError, match="at least one"):
        risk_coverage_figure({})


def test_accuracy_vs_shots_figure(tmp_path):
    rows = [
        ("protonet", 5, 0.62, 0.01),
        ("protonet", 1, 0.45, 0.02),
        ("simpleshot", 1, 0.48, 0.02),
        ("protonet", 10, 0.70, 0.01),
        ("simpleshot", 5, 0.66, float("nan")),
        ("simpleshot", 10, 0.73, 0.01),
    ]
    figure = accuracy_vs_shots_figure(rows, metric="balanced_accuracy", title="shots")
    (ax,) = figure.axes
    assert [line.get_label() for line in ax.lines] == ["protonet", "simpleshot"]
    np.testing.assert_array_equal(ax.lines[0].get_xdata(), [1, 5, 10])
    np.testing.assert_allclose(ax.lines[0].get_ydata(), [0.45, 0.62, 0.70])
    assert len(ax.collections) == 2  # one CI band per method
    assert list(ax.get_xticks()) == [1, 5, 10]
    assert ax.get_ylabel() == "balanced accuracy"
    _assert_png(figure, tmp_path / "shots.png")
    with pytest.raises(ValueError, match="at least one"):
        accuracy_vs_shots_figure([])
