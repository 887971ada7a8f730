"""The label-free calibration of ``benchmarks.scripts.transductive_calibration``: ATC's predicted
accuracy and the temperature that matches it, against hand computation."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.scripts.transductive_calibration import atc_accuracy, confidence_matching_temperature


def test_the_matching_temperature_gives_the_target_mean_confidence():
    # two classes, logits (a, 0): the top-label confidence is sigmoid(a / T), so T = a / logit(target)
    logits = np.array([[[3.0, 0.0], [0.0, 3.0]], [[1.0, 0.0], [0.0, 1.0]]])  # (2 episodes, 2, 2)
    target = np.array([0.75, 0.6])
    expected = np.array([3.0 / np.log(3.0), 1.0 / np.log(1.5)])
    np.testing.assert_allclose(confidence_matching_temperature(logits, target), expected, rtol=1e-9)


def test_an_unreachable_target_ends_at_the_bounds():
    logits = np.array([[[2.0, 0.0, 0.0]]])
    # below 1/C no temperature reaches the target: the largest one (near uniform); 1 needs the smallest
    assert confidence_matching_temperature(logits, np.array([0.2]))[0] == pytest.approx(100.0)
    assert confidence_matching_temperature(logits, np.array([1.0]))[0] == pytest.approx(0.01)


def test_atc_sets_the_threshold_on_val_and_counts_test_queries_above_it():
    # val: four queries of confidences 0.9, 0.8, 0.7, 0.6 (two classes), three right: accuracy 0.75,
    # so a quarter of the val confidences lie below the threshold: 0.675 (numpy's linear quantile)
    confidence = np.array([0.9, 0.8, 0.7, 0.6])
    val_logits = np.stack([np.log(confidence), np.log(1 - confidence)], axis=-1)[None]
    val_labels = np.array([[0, 0, 0, 1]])
    threshold = np.quantile(confidence, 0.25)
    test_confidence = np.array([[0.95, 0.65, 0.55, 0.99], [0.66, 0.68, 0.70, 0.52]])
    test_logits = np.stack([np.log(test_confidence), np.log(1 - test_confidence)], axis=-1)
    expected = (test_confidence > threshold).mean(axis=1)
    np.testing.assert_allclose(atc_accuracy(val_logits, val_labels, test_logits), expected)
    assert threshold == pytest.approx(0.675) and expected.tolist() == [0.5, 0.5]
