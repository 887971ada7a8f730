"""Label flips, the feature-collision poison and the deep k-NN defence, against hand computation."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

from fewshot_med.robustness.poisoning import (
    deep_knn_flags,
    feature_collision_poison,
    flip_labels,
    peri_neighbours,
)


@pytest.mark.parametrize(("n", "rate", "n_classes"), [(37, 0.3, 3), (15, 0.4, 3), (10, 1.0, 2), (8, 0.0, 4)])
def test_flip_labels_flips_exactly_round_rate_n_and_never_to_the_same_label(n, rate, n_classes):
    labels = np.arange(n) % n_classes
    flipped, mask = flip_labels(labels, rate, n_classes, np.random.default_rng(0))
    assert mask.sum() == round(rate * n)
    assert (flipped[mask] != labels[mask]).all() and (flipped[~mask] == labels[~mask]).all()
    assert flipped.min() >= 0 and flipped.max() < n_classes and (labels == np.arange(n) % n_classes).all()


def test_flip_labels_refuses_a_rate_outside_zero_one():
    with pytest.raises(ValueError, match="rate in"):
        flip_labels(np.zeros(4, dtype=int), 1.5, 2, np.random.default_rng(0))


def _linear_backbone(seed: int = 0) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    weights = torch.randn(2, 3 * 4 * 4, generator=torch.Generator().manual_seed(seed))
    return weights, lambda images: images.flatten(1) @ weights.T


def test_one_forward_backward_step_matches_the_hand_computation():
    weights, backbone = _linear_backbone()
    rng = torch.Generator().manual_seed(1)
    base, target = torch.rand(3, 4, 4, generator=rng) * 0.5 + 0.25, torch.rand(3, 4, 4, generator=rng)
    lr, beta = 1e-3, 0.5
    gradient = 2 * weights.T @ (weights @ base.flatten() - weights @ target.flatten())  # of |Wx-Wt|^2 at b
    expected = ((base.flatten() - lr * gradient + lr * beta * base.flatten()) / (1 + lr * beta)).clamp(0, 1)
    poison = feature_collision_poison(backbone, base, target, beta, steps=1, lr=lr)
    torch.testing.assert_close(poison.flatten(), expected)


def test_feature_collision_moves_the_features_to_the_target_and_stays_near_the_base():
    _, backbone = _linear_backbone()
    rng = torch.Generator().manual_seed(2)
    base, target = torch.rand(2, 3, 4, 4, generator=rng) * 0.5 + 0.25, torch.rand(2, 3, 4, 4, generator=rng)
    poison = feature_collision_poison(backbone, base, target, beta=0.1, steps=200, lr=1e-3)
    before = (backbone(base) - backbone(target)).norm(dim=1)
    after = (backbone(poison) - backbone(target)).norm(dim=1)
    assert (after < 0.1 * before).all()  # the features collide ...
    # ... while the image moved far less than the way to the target image (2 of 48 directions matter)
    assert ((poison - base).flatten(1).norm(dim=1) < 0.5 * (target - base).flatten(1).norm(dim=1)).all()
    assert poison.min() >= 0 and poison.max() <= 1 and poison.shape == base.shape


def test_a_larger_beta_keeps_the_poison_closer_to_the_base():
    _, backbone = _linear_backbone()
    rng = torch.Generator().manual_seed(3)
    base, target = torch.rand(3, 4, 4, generator=rng) * 0.5 + 0.25, torch.rand(3, 4, 4, generator=rng)
    near, far = (feature_collision_poison(backbone, base, target, b, 100, 1e-3) for b in (50.0, 0.0))
    assert (near - base).norm() < (far - base).norm()


def _blobs(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = np.array([[6.0, 0, 0, 0], [0, 6.0, 0, 0], [0, 0, 6.0, 0]])
    labels = np.repeat(np.arange(3), 8)
    return centres[labels] + rng.normal(size=(24, 4)), labels


def test_deep_knn_flags_the_planted_mislabelled_point():
    features, labels = _blobs(4)
    labels[5] = 2  # a point of blob 0 labelled 2
    flags, disagreement = deep_knn_flags(features, labels)
    assert np.flatnonzero(flags).tolist() == [5] and disagreement[5] == 1.0


def _brute_force(features: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    flags = np.zeros(len(labels), dtype=bool)
    for i in range(len(labels)):
        distance = np.linalg.norm(unit - unit[i], axis=1)
        distance[i] = np.inf
        votes = np.bincount(labels[np.argsort(distance, kind="stable")[:k]], minlength=labels.max() + 1)
        flags[i] = votes[labels[i]] < votes.max()  # a tie keeps the given label
    return flags


@pytest.mark.parametrize("seed", [5, 6, 7])
def test_deep_knn_agrees_with_a_brute_force_computation(seed):
    rng = np.random.default_rng(seed)
    features, labels = rng.normal(size=(40, 6)), rng.integers(0, 3, size=40)
    np.testing.assert_array_equal(deep_knn_flags(features, labels, k=5)[0], _brute_force(features, labels, 5))


def test_peri_k_is_the_median_class_size():
    assert peri_neighbours(np.array([0] * 5 + [1] * 6 + [2] * 4)) == 5
