import numpy as np
import pytest

from fewshot_med.evaluation.metrics import accuracy
from fewshot_med.evaluation.selective import accuracy_at_coverage, aurc, risk_coverage_curve


def _rows(confidence, predicted, n_classes=3):
    """Probability rows with the given top-label confidence on the given predicted class."""
    confidence = np.asarray(confidence, dtype=np.float64)
    probs = np.repeat(((1.0 - confidence) / (n_classes - 1))[:, None], n_classes, axis=1)
    probs[np.arange(len(confidence)), predicted] = confidence
    return probs


# Confidences 0.9 (right), 0.8 (wrong), 0.7 (right), 0.6 (wrong), given out of order.
HAND_PROBS = np.array([[0.3, 0.7], [0.9, 0.1], [0.4, 0.6], [0.8, 0.2]])
HAND_LABELS = np.array([1, 0, 0, 1])


def test_risk_coverage_curve_by_hand():
    coverage, risk = risk_coverage_curve(HAND_PROBS, HAND_LABELS)
    np.testing.assert_allclose(coverage, [0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(risk, [0.0, 1 / 2, 1 / 3, 2 / 4])
    assert float(aurc(HAND_PROBS, HAND_LABELS)) == pytest.approx((0 + 1 / 2 + 1 / 3 + 1 / 2) / 4)


def test_tied_confidences_enter_together_in_any_order():
    # Confidences 0.9 (right), 0.7 (wrong), 0.7 (right), 0.6 (right).
    probs = _rows([0.9, 0.7, 0.7, 0.6], [0, 1, 2, 0])
    labels = np.array([0, 0, 2, 0])
    expected = [0.0, 1 / 3, 1 / 3, 1 / 4]
    for order in ([0, 1, 2, 3], [0, 2, 1, 3], [3, 2, 1, 0]):
        _, risk = risk_coverage_curve(probs[order], labels[order])
        np.testing.assert_allclose(risk, expected)
    assert float(accuracy_at_coverage(probs, labels, 0.5)) == pytest.approx(2 / 3)


def test_constant_confidence_gives_flat_curve_at_error_rate():
    probs = np.full((6, 3), 1 / 3)
    labels = np.array([0, 0, 1, 2, 1, 0])  # argmax is class 0: 3 of 6 right
    _, risk = risk_coverage_curve(probs, labels)
    np.testing.assert_allclose(risk, np.full(6, 0.5))
    assert float(aurc(probs, labels)) == pytest.approx(0.5)


def test_perfect_ranking_gives_minimal_aurc():
    rng = np.random.default_rng(0)
    n, n_right = 30, 21
    predicted = rng.integers(0, 3, n)
    labels = predicted.copy()
    labels[n_right:] = (predicted[n_right:] + 1) % 3
    # Perfect ranking: every right sample more confident than every wrong one.
    confidence = np.linspace(0.95, 0.4, n)
    best = float(aurc(_rows(confidence, predicted), labels))
    k = np.arange(1, n + 1)
    assert best == pytest.approx(np.mean(np.maximum(0, k - n_right) / k))
    for _ in range(20):
        shuffled = float(aurc(_rows(rng.permutation(confidence), predicted), labels))
        assert shuffled >= best - 1e-12
    assert float(aurc(_rows(confidence[::-1], predicted), labels)) > best


def test_episode_batch_equals_per_episode_loop():
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.ones(4), size=(5, 20))
    probs[:, ::3] = np.round(probs[:, ::3], 1)  # create exact ties in confidence
    probs /= probs.sum(axis=-1, keepdims=True)
    labels = rng.integers(0, 4, (5, 20))
    batched_aurc = aurc(probs, labels)
    batched_acc = accuracy_at_coverage(probs, labels, 0.4)
    _, batched_risk = risk_coverage_curve(probs, labels)
    assert batched_aurc.shape == batched_acc.shape == (5,)
    assert batched_risk.shape == (5, 20)
    for e in range(5):
        np.testing.assert_allclose(batched_aurc[e], aurc(probs[e], labels[e]))
        np.testing.assert_allclose(batched_acc[e], accuracy_at_coverage(probs[e], labels[e], 0.4))
        np.testing.assert_allclose(batched_risk[e], risk_coverage_curve(probs[e], labels[e])[1])
    assert np.ndim(aurc(probs[0], labels[0])) == 0
    assert aurc(probs.reshape(1, 5, 20, 4), labels.reshape(1, 5, 20)).shape == (1, 5)


def test_accuracy_at_coverage_by_hand_and_full_coverage_is_accuracy():
    assert float(accuracy_at_coverage(HAND_PROBS, HAND_LABELS, 0.25)) == 1.0
    assert float(accuracy_at_coverage(HAND_PROBS, HAND_LABELS, 0.3)) == 0.5  # ceil(1.2) = 2 kept
    assert float(accuracy_at_coverage(HAND_PROBS, HAND_LABELS, 0.75)) == pytest.approx(2 / 3)
    rng = np.random.default_rng(2)
    probs = rng.dirichlet(np.ones(3), size=100)
    labels = rng.integers(0, 3, 100)
    assert float(accuracy_at_coverage(probs, labels, 1.0)) == pytest.approx(accuracy(probs, labels))
    # 0.07 · 100 is 7.000000000000001 in floating point: still 7 samples kept, not 8.
    _, risk = risk_coverage_curve(probs, labels)
    assert risk[6] != risk[7]
    assert float(accuracy_at_coverage(probs, labels, 0.07)) == pytest.approx(1 - risk[6])


@pytest.mark.parametrize("coverage", [0, 0.0, -0.1, 1.0001, float("nan"), True, "0.5"])
def test_accuracy_at_coverage_rejects_bad_coverage(coverage):
    with pytest.raises(ValueError, match="coverage"):
        accuracy_at_coverage(HAND_PROBS, HAND_LABELS, coverage)


@pytest.mark.parametrize(
    ("probs", "labels"),
    [(np.ones(4) / 4, np.zeros(1)), (np.ones((4, 2)) / 2, np.zeros(3)), (np.ones((0, 2)), np.zeros(0))],
)
def test_shape_validation(probs, labels):
    with pytest.raises(ValueError, match="must be"):
        aurc(probs, labels)
    with pytest.raises(ValueError, match="must be"):
        risk_coverage_curve(probs, labels)
