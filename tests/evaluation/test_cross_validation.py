"""Cross-validation on few images: fold properties, out-of-fold logits against a hand computation,
metrics against scikit-learn, cross-fitted temperatures and the abstention threshold."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score, confusion_matrix, log_loss, roc_auc_score

from fewshot_med.errors import DataError
from fewshot_med.evaluation.calibration import TemperatureScaling
from fewshot_med.evaluation.cross_validation import (
    abstention_threshold,
    calibrated_probs,
    confusion_counts,
    cross_fitted_temperatures,
    cv_metrics,
    make_folds,
    out_of_fold_logits,
)
from fewshot_med.evaluation.metrics import softmax
from fewshot_med.methods import MethodContext, create_method


def _random_labels(rng: np.random.Generator) -> np.ndarray:
    counts = rng.integers(2, 10, size=rng.integers(2, 5))
    return rng.permutation(np.repeat(np.arange(len(counts)), counts))


@pytest.mark.parametrize("seed", range(25))
def test_stratified_folds_score_every_image_once_per_repeat_and_keep_every_class_in_training(seed):
    rng = np.random.default_rng(seed)
    labels = _random_labels(rng)
    asked, repeats = int(rng.integers(2, 8)), int(rng.integers(1, 4))
    folds = make_folds(labels, n_folds=asked, n_repeats=repeats, seed=seed)
    counts = np.bincount(labels)
    assert folds.scheme == "stratified" and folds.n_folds == min(asked, counts.min())
    assert folds.fold.shape == (repeats, len(labels)) and folds.n_repeats == repeats
    for repeat, row in enumerate(folds.fold):
        assert set(row.tolist()) == set(range(folds.n_folds))  # every image out of fold exactly once
        per_fold = np.stack(
            [np.bincount(labels[row == f], minlength=len(counts)) for f in range(folds.n_folds)]
        )
        assert (per_fold.max(axis=0) - per_fold.min(axis=0) <= 1).all()  # stratified
        tests = [test for r, _, test in folds.splits() if r == repeat]
        assert sorted(np.concatenate(tests).tolist()) == list(range(len(labels)))
    for _, train, test in folds.splits():
        assert set(labels[train].tolist()) == set(range(len(counts)))
        assert not set(train.tolist()) & set(test.tolist())


@pytest.mark.parametrize("seed", range(25))
def test_grouped_folds_never_split_a_patient(seed):
    rng = np.random.default_rng(seed)
    n_patients = int(rng.integers(6, 20))
    patient_class = np.concatenate([np.arange(3), rng.integers(0, 3, size=n_patients - 3)])
    patient_class = np.concatenate([patient_class, np.arange(3)])  # every class in ≥ 2 patients
    sizes = rng.integers(1, 4, size=len(patient_class))
    groups = np.repeat([f"p{i}" for i in range(len(patient_class))], sizes)
    labels = np.repeat(patient_class, sizes)
    folds = make_folds(labels, groups, n_folds=5, n_repeats=2, seed=seed)
    assert folds.scheme in ("stratified_group", "leave_one_patient_out")
    for row in folds.fold:
        assert (row >= 0).all()
        for patient in np.unique(groups):
            assert len(set(row[groups == patient].tolist())) == 1  # a patient stays in one fold
    for _, train, test in folds.splits():
        assert not set(groups[train].tolist()) & set(groups[test].tolist())
        assert set(labels[train].tolist()) == {0, 1, 2}


def test_fewer_patients_than_folds_gives_leave_one_patient_out():
    labels = np.array([0, 0, 0, 1, 1, 1, 1])
    groups = np.array(["a", "a", "b", "c", "c", "d", "e"])
    folds = make_folds(labels, groups, n_folds=10, n_repeats=3)
    assert (folds.scheme, folds.n_folds, folds.n_repeats) == ("leave_one_patient_out", 5, 1)
    held_out = [sorted(set(groups[test])) for _, _, test in folds.splits()]
    assert sorted(held_out) == [["a"], ["b"], ["c"], ["d"], ["e"]]


def test_folds_refuse_a_class_of_one_image_or_one_patient():
    with pytest.raises(DataError, match="class 1 has 1 image"):
        make_folds(np.array([0, 0, 0, 1]))
    with pytest.raises(DataError, match="class 1 has images of only one patient"):
        make_folds(np.array([0, 0, 1, 1]), np.array(["a", "b", "c", "c"]))


def test_out_of_fold_accuracy_equals_a_hand_computed_nearest_centroid():
    rng = np.random.default_rng(3)
    labels = np.repeat(np.arange(3), [7, 6, 5])
    centres = rng.normal(size=(3, 8))
    features = centres[labels] + 1.5 * rng.normal(size=(len(labels), 8))
    mean = features.mean(axis=0)
    folds = make_folds(labels, n_folds=4, n_repeats=2, seed=1)
    context = MethodContext(base_feature_mean=torch.tensor(mean, dtype=torch.float32))
    logits = out_of_fold_logits(
        lambda: create_method("simpleshot", context),
        torch.tensor(features, dtype=torch.float32),
        labels,
        folds,
    )
    transformed = features - mean
    transformed /= np.linalg.norm(transformed, axis=1, keepdims=True)  # SimpleShot's CL2N
    hits = np.zeros(folds.fold.shape, dtype=bool)
    for repeat, train, test in folds.splits():
        centroids = np.stack([transformed[train][labels[train] == c].mean(axis=0) for c in range(3)])
        distances = np.linalg.norm(transformed[test][:, None] - centroids[None], axis=-1)
        hits[repeat, test] = distances.argmin(axis=1) == labels[test]
    assert logits.shape == (2, len(labels), 3) and not np.isnan(logits).any()
    assert (logits.argmax(axis=-1) == labels).mean() == pytest.approx(hits.mean())
    metrics = cv_metrics(softmax(logits), labels, n_boot=200)
    assert metrics["accuracy"].value == pytest.approx(hits.mean())


def test_cv_metrics_match_scikit_learn_per_repeat_and_intervals_bracket_them():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), [6, 5, 7])
    probs = softmax(rng.normal(size=(2, len(labels), 3)) + 2 * np.eye(3)[labels])
    metrics = cv_metrics(probs, labels, n_boot=300, seed=1)
    expected = {
        "accuracy": np.mean([(p.argmax(1) == labels).mean() for p in probs]),
        "balanced_accuracy": np.mean([balanced_accuracy_score(labels, p.argmax(1)) for p in probs]),
        "macro_auroc": np.mean([roc_auc_score(labels, p, multi_class="ovr", average="macro") for p in probs]),
        "nll": np.mean([log_loss(labels, p, labels=[0, 1, 2]) for p in probs]),
    }
    for name, value in expected.items():
        assert metrics[name].value == pytest.approx(value, abs=1e-9), name
        assert metrics[name].low <= metrics[name].value <= metrics[name].high
    recall = confusion_matrix(labels, probs[0].argmax(1), normalize="true").diagonal()
    recall = (recall + confusion_matrix(labels, probs[1].argmax(1), normalize="true").diagonal()) / 2
    assert [metrics[f"recall.{c}"].value for c in range(3)] == pytest.approx(recall.tolist())
    grouped = cv_metrics(probs, labels, groups=np.arange(len(labels)) // 2, n_boot=300)
    assert grouped["accuracy"].value == metrics["accuracy"].value  # groups change the interval only
    assert grouped["accuracy"].half_width > 0


def test_confusion_counts_sum_every_repeat():
    labels = np.array([0, 0, 1, 1])
    probs = np.array([np.eye(2)[[0, 1, 1, 1]], np.eye(2)[[0, 0, 0, 1]]])
    assert confusion_counts(probs, labels).tolist() == [[3, 1], [1, 3]]


def test_cross_fitted_temperature_of_a_fold_comes_from_the_other_folds():
    rng = np.random.default_rng(2)
    labels = np.repeat(np.arange(2), 6)
    folds = make_folds(labels, n_folds=3, n_repeats=1, seed=0)
    logits = 3 * rng.normal(size=(1, len(labels), 2)) + 4 * np.eye(2)[labels]
    temperatures = cross_fitted_temperatures(logits, labels, folds)
    for _, train, test in folds.splits():
        expected = TemperatureScaling(0.05, 100.0).fit(logits[0, train], labels[train]).temperature_
        assert temperatures[0, test] == pytest.approx(expected)
    assert calibrated_probs(logits, temperatures).shape == logits.shape


def test_abstention_threshold_reaches_the_target_coverage_or_accuracy():
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 3, size=40)
    probs = softmax(rng.normal(size=(2, 40, 3)) + 1.5 * np.eye(3)[labels])
    confidence, correct = probs.max(-1).ravel(), (probs.argmax(-1) == labels).ravel()
    threshold, coverage, accuracy = abstention_threshold(probs, labels, coverage=0.9)
    kept = confidence >= threshold
    assert coverage == kept.mean() and 0.9 <= coverage < 0.9 + 1 / 80 + 1e-12
    assert accuracy == correct[kept].mean()
    target = 0.8
    threshold, coverage, accuracy = abstention_threshold(probs, labels, accuracy=target)
    reaching = [  # every threshold at an observed confidence whose kept images reach the target
        (confidence >= t).mean() for t in np.unique(confidence) if correct[confidence >= t].mean() >= target
    ]
    assert accuracy >= target and coverage == max(reaching) < 1
    assert (confidence >= threshold).mean() == coverage
    assert abstention_threshold(probs, labels, coverage=1.0)[0] is None
    unreachable = abstention_threshold(np.full((1, 4, 2), 0.5), np.array([0, 1, 0, 1]), accuracy=0.99)
    assert unreachable == (None, 1.0, 0.5)
