import math

import numpy as np
import pytest
import torch
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    brier_score_loss,
    log_loss,
    roc_auc_score,
)

from fewshot_med.evaluation import (
    METRICS,
    accuracy,
    adaptive_ece,
    balanced_accuracy,
    brier,
    classwise_ece,
    ece,
    macro_auroc,
    mce,
    nll,
    softmax,
)
from fewshot_med.evaluation.metrics import metrics_from_probs, pooled_ece


def _random_task(n=60, n_classes=4, seed=0):
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.ones(n_classes), size=n)
    labels = np.concatenate([np.arange(n_classes), rng.integers(0, n_classes, n - n_classes)])
    return probs, labels


def test_registry_names_and_order():
    assert list(METRICS) == [
        "accuracy",
        "balanced_accuracy",
        "macro_auroc",
        "ece",
        "adaptive_ece",
        "classwise_ece",
        "mce",
        "brier",
        "nll",
        "aurc",
    ]


def test_ece_and_mce_by_hand():
    probs = np.array(
        [
            [0.95, 0.03, 0.02],  # label 0: confidence 0.95, correct  -> bin 14 (0.933, 1]
            [0.95, 0.02, 0.03],  # label 1: confidence 0.95, wrong    -> bin 14
            [0.05, 0.90, 0.05],  # label 1: confidence 0.90, correct  -> bin 13 (0.867, 0.933]
            [0.50, 0.30, 0.20],  # label 0: confidence 0.50, correct  -> bin 7 (0.467, 0.533]
            [0.20, 0.50, 0.30],  # label 2: confidence 0.50, wrong    -> bin 7
            [0.35, 0.33, 0.32],  # label 0: confidence 0.35, correct  -> bin 5 (0.333, 0.4]
        ]
    )
    labels = np.array([0, 1, 1, 0, 2, 0])
    # bin 14: 2 samples, accuracy 0.5, confidence 0.95 -> gap 0.45
    # bin 13: 1 sample,  accuracy 1.0, confidence 0.90 -> gap 0.10
    # bin  7: 2 samples, accuracy 0.5, confidence 0.50 -> gap 0.00
    # bin  5: 1 sample,  accuracy 1.0, confidence 0.35 -> gap 0.65
    # ECE = (2 * 0.45 + 1 * 0.10 + 2 * 0.00 + 1 * 0.65) / 6 = 1.65 / 6 = 0.275; MCE = 0.65
    assert ece(probs, labels) == pytest.approx(0.275)
    assert mce(probs, labels) == pytest.approx(0.65)
    assert accuracy(probs, labels) == pytest.approx(4 / 6)


def test_bins_are_closed_on_the_right():
    # 2 bins (0, 0.5] and (0.5, 1]: a confidence of exactly 0.5 belongs to the first bin.
    probs = np.array([[0.5, 0.5], [0.8, 0.2]])
    labels = np.array([0, 1])
    # first bin: accuracy 1, confidence 0.5; second: accuracy 0, confidence 0.8 -> (0.5 + 0.8) / 2
    # (were 0.5 in the second bin: one bin, accuracy 0.5, confidence 0.65 -> 0.15)
    assert ece(probs, labels, n_bins=2) == pytest.approx(0.65)
    assert mce(probs, labels, n_bins=2) == pytest.approx(0.8)
    assert ece(np.array([[1.0, 0.0]]), np.array([0])) == 0.0  # confidence 1 falls in the last bin


@pytest.mark.parametrize("seed", [0, 1])
def test_against_scikit_learn(seed):
    probs, labels = _random_task(seed=seed)
    predicted = probs.argmax(axis=1)
    assert accuracy(probs, labels) == pytest.approx(accuracy_score(labels, predicted))
    assert balanced_accuracy(probs, labels) == pytest.approx(balanced_accuracy_score(labels, predicted))
    expected_auroc = roc_auc_score(labels, probs, multi_class="ovr", average="macro")
    assert macro_auroc(probs, labels) == pytest.approx(expected_auroc)
    assert nll(probs, labels) == pytest.approx(log_loss(labels, probs, labels=range(4)))
    one_hot = np.eye(4)[labels]
    assert brier(probs, labels) == pytest.approx(np.mean(np.sum((probs - one_hot) ** 2, axis=1)))


def test_binary_auroc_with_ties_and_brier():
    rng = np.random.default_rng(3)
    p1 = np.round(rng.uniform(size=50), 1)  # many ties
    probs = np.stack([1 - p1, p1], axis=1)
    labels = rng.integers(0, 2, 50)
    assert macro_auroc(probs, labels) == pytest.approx(roc_auc_score(labels, p1))
    # multi-class Brier sums both columns: twice scikit-learn's binary score
    assert brier(probs, labels) == pytest.approx(2 * brier_score_loss(labels, p1))


def test_absent_classes_are_skipped():
    probs, labels = _random_task(n=40, n_classes=3, seed=5)
    labels = np.where(labels == 2, 1, labels)  # class 2 never occurs
    expected = np.mean([roc_auc_score(labels == c, probs[:, c]) for c in (0, 1)])
    assert macro_auroc(probs, labels) == pytest.approx(expected)
    expected_balanced = np.mean([np.mean(probs[labels == c].argmax(1) == c) for c in (0, 1)])
    assert balanced_accuracy(probs, labels) == pytest.approx(expected_balanced)
    assert math.isnan(macro_auroc(probs, np.zeros(40, dtype=np.int64)))


def test_perfect_predictions():
    labels = np.array([0, 1, 2, 2, 1, 0])
    metrics = metrics_from_probs(softmax(np.eye(3)[labels] * 100.0), labels)
    assert metrics["accuracy"] == metrics["balanced_accuracy"] == metrics["macro_auroc"] == 1.0
    for name in ("ece", "adaptive_ece", "classwise_ece", "mce", "brier", "nll"):
        assert metrics[name] == pytest.approx(0.0, abs=1e-12)


def test_uniform_predictions():
    labels = np.array([0, 1, 2, 3, 1, 2, 3, 0])
    metrics = metrics_from_probs(softmax(np.zeros((8, 4))), labels)
    # argmax of a tie is class 0: 2 of 8 correct, recall 1 for class 0 and 0 for the others
    assert metrics["accuracy"] == pytest.approx(0.25)
    assert metrics["balanced_accuracy"] == pytest.approx(0.25)
    assert metrics["macro_auroc"] == pytest.approx(0.5)
    assert metrics["ece"] == pytest.approx(0.0) and metrics["mce"] == pytest.approx(0.0)
    assert metrics["adaptive_ece"] == pytest.approx(0.0)
    # class-wise: every column says 1/4; class 0 occurs 2 of 8 times, so does every class -> 0
    assert metrics["classwise_ece"] == pytest.approx(0.0)
    assert metrics["brier"] == pytest.approx(1 - 1 / 4)  # (3/4)^2 + 3 * (1/4)^2
    assert metrics["nll"] == pytest.approx(math.log(4))


def test_nll_is_clipped():
    assert nll(np.array([[1.0, 0.0]]), np.array([1])) == pytest.approx(-math.log(1e-12))


def test_softmax_is_stable_and_accepts_tensors():
    logits = np.array([[1000.0, 0.0, -1000.0], [1.0, 2.0, 3.0]])
    probs = softmax(logits)
    assert np.all(np.isfinite(probs)) and probs[0, 0] == 1.0
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)
    np.testing.assert_allclose(softmax(logits + 50.0), probs)
    np.testing.assert_allclose(softmax(torch.tensor(logits, dtype=torch.float32)), probs, atol=1e-6)
    labels = np.array([0, 2])
    from_tensors = metrics_from_probs(softmax(torch.tensor(logits)), torch.tensor(labels))
    assert from_tensors == metrics_from_probs(probs, labels)


def test_shape_errors():
    with pytest.raises(ValueError, match="must be"):
        accuracy(np.ones((3, 2)) / 2, np.array([0, 1]))


def test_adaptive_ece_by_hand():
    # 4 samples, 2 equal-mass bins: the two least confident, then the two most confident
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.7, 0.3], [0.55, 0.45]])
    labels = np.array([0, 1, 0, 0])
    # low bin: confidences 0.55 (right), 0.6 (wrong) -> |0.5 - 0.575| = 0.075, weight 2/4
    # high bin: 0.7 (right), 0.9 (right) -> |1 - 0.8| = 0.2, weight 2/4
    assert adaptive_ece(probs, labels, n_bins=2) == pytest.approx(0.5 * 0.075 + 0.5 * 0.2)
    # fewer samples than bins: one sample a bin, so every sample's own |correct - confidence|
    expected = np.mean([0.1, 0.6, 0.3, 0.45])
    assert adaptive_ece(probs, labels, n_bins=15) == pytest.approx(expected)


def test_classwise_ece_by_hand():
    probs = np.array([[0.8, 0.2], [0.3, 0.7]])
    labels = np.array([0, 0])
    # 2 bins (0, 0.5], (0.5, 1]. Class 0 column: 0.8 (event 1) in bin 2, 0.3 (event 1) in bin 1
    # -> (|1 - 0.8| + |1 - 0.3|) / 2 = 0.45. Class 1 column: 0.2 (event 0), 0.7 (event 0)
    # -> (0.2 + 0.7) / 2 = 0.45. Mean over classes 0.45.
    assert classwise_ece(probs, labels, n_bins=2) == pytest.approx(0.45)


@pytest.mark.parametrize("name", list(METRICS))
def test_episode_batches_equal_one_call_per_episode(name):
    rng = np.random.default_rng(7)
    probs = rng.dirichlet(np.ones(3), size=(5, 2, 12))  # (5, 2) episodes of 12 samples
    labels = rng.integers(0, 3, (5, 2, 12))
    labels[0, 0] = 1  # one class only: AUROC is NaN there
    batched = METRICS[name](probs, labels)
    assert isinstance(batched, np.ndarray) and batched.shape == (5, 2)
    looped = np.array([[METRICS[name](probs[i, j], labels[i, j]) for j in range(2)] for i in range(5)])
    np.testing.assert_allclose(batched, looped, rtol=1e-12, atol=1e-15)
    assert isinstance(METRICS[name](probs[1, 1], labels[1, 1]), float)


def test_pooled_ece_is_the_ece_of_all_queries_with_a_bootstrap_interval():
    rng = np.random.default_rng(3)
    probs = rng.dirichlet(np.ones(3), size=(40, 12))  # 40 episodes of 12 queries
    labels = rng.integers(0, 3, (40, 12))
    value, half_width = pooled_ece(probs, labels, n_bins=10, n_boot=300, seed=1)
    assert value == pytest.approx(ece(probs.reshape(-1, 3), labels.ravel(), n_bins=10))
    assert 0 < half_width < value
    assert pooled_ece(probs, labels, n_bins=10, n_boot=300, seed=1) == (value, half_width)
    # per-episode ECE of few samples is biased upwards against the pooled one
    assert np.mean(ece(probs, labels, n_bins=10)) > value
    with pytest.raises(ValueError, match="needs \\(E, n, C\\) episodes"):
        pooled_ece(probs[0], labels[0])
