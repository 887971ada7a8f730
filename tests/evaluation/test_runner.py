import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fewshot_med.data import ClassSubset, sample_episodes
from fewshot_med.errors import DataError
from fewshot_med.evaluation import (
    GENERALISED_METRICS,
    METRICS,
    evaluate_frozen,
    evaluate_generalised,
    evaluate_images,
    evaluate_oracle,
    paired_difference_ci95,
    runner,
)
from fewshot_med.methods import MethodContext, create_method


class NearestCentroid:
    """Stand-in method: logits are negative squared distances to class means. Like every frozen-feature
    method it takes episode batches, ``(E, n, D)`` with ``(E, n)`` labels; images come one episode at
    a time."""

    inputs = "features"
    transductive = False

    def fit(self, support: torch.Tensor, labels: torch.Tensor) -> "NearestCentroid":
        self.lead_ = labels.ndim
        one_hot = F.one_hot(labels).to(torch.float64)
        sums = one_hot.transpose(-1, -2) @ support.flatten(self.lead_).double()
        self.centroids_ = sums / one_hot.sum(dim=-2).unsqueeze(-1)
        return self

    def predict_logits(self, query: torch.Tensor) -> torch.Tensor:
        if self.lead_ == 2 and query.ndim == 2:  # pool features shared by all episodes
            query = query.unsqueeze(0)
        return -(torch.cdist(query.flatten(self.lead_).double(), self.centroids_) ** 2)


class Recording(NearestCentroid):
    """Remembers what it was fitted on and asked about."""

    def fit(self, support, labels):
        self.support, self.labels = support.clone(), labels.clone()
        return super().fit(support, labels)

    def predict_logits(self, query):
        self.query = query.clone()
        return super().predict_logits(query)


class ImageCentroid(NearestCentroid):
    inputs = "images"


def _pool(counts=(20, 25, 30), split="test", seed=0) -> tuple[ClassSubset, torch.Tensor]:
    """A pool whose split rows differ from its positions, and separable 8-d features for it."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(counts)), counts)
    means = 10.0 * np.eye(8)[: len(counts)]
    features = torch.tensor(means[labels] + rng.normal(size=(len(labels), 8)), dtype=torch.float32)
    pool = ClassSubset(
        images=(labels[:, None, None, None] * 80 + rng.integers(0, 10, (len(labels), 4, 4, 3))).astype(
            np.uint8
        ),
        labels=labels,
        indices=np.arange(len(labels)) * 3 + 5,
        class_names=tuple(f"c{i}" for i in range(len(counts))),
        split=split,
        dataset_digest="d" * 64,
    )
    return pool, features


def test_frozen_perfectly_separable():
    pool, features = _pool()
    episodes = sample_episodes(pool, n_way=3, k_shot=5, n_query=10, n_episodes=12, seed=0)
    results = evaluate_frozen(NearestCentroid, features, pool, episodes, label="nc")
    assert (results.method, results.k_shot, len(results)) == ("nc", 5, 12)
    assert results.logits.shape == results.probs.shape == (12, 30, 3) and results.labels.shape == (12, 30)
    np.testing.assert_allclose(results.probs.sum(axis=-1), 1.0)
    assert list(results.summary()) == [*METRICS, "accuracy_at_coverage", "ece_pooled"]
    assert results.summary()["accuracy"] == (1.0, 0.0)
    np.testing.assert_array_equal(results.values("accuracy"), np.ones(12))
    assert evaluate_frozen(NearestCentroid, features, pool, episodes).method == "NearestCentroid"


def test_feature_rows_map_to_split_rows():
    pool, _ = _pool()
    # feature of pool image i = (its split row, its pool label)
    features = torch.tensor(np.stack([pool.indices, pool.labels], axis=1), dtype=torch.float64)
    episodes = sample_episodes(pool, n_way=2, k_shot=3, n_query=4, n_episodes=5, seed=1)
    fitted = []

    def factory():
        fitted.append(Recording())
        return fitted[-1]

    evaluate_frozen(factory, features, pool, episodes)
    assert len(fitted) == 1  # one batched fit for all episodes
    method = fitted[0]
    assert method.support.shape == (5, 2 * 3, 2) and method.query.shape == (5, 2 * 4, 2)
    for index, episode in enumerate(episodes.episodes):
        np.testing.assert_array_equal(method.support[index, :, 0].numpy(), episode.support_rows())
        np.testing.assert_array_equal(method.query[index, :, 0].numpy(), episode.query_rows())
        np.testing.assert_array_equal(method.labels[index].numpy(), episode.support_labels())
        pool_labels = [pool.class_names.index(name) for name in episode.classes]
        np.testing.assert_array_equal(
            method.support[index, :, 1].numpy(), np.take(pool_labels, episode.support_labels())
        )


def test_episode_batches_are_split_and_joined_in_order(monkeypatch):
    pool, features = _pool()
    episodes = sample_episodes(pool, 3, 2, 5, 7, seed=0)
    whole = evaluate_frozen(NearestCentroid, features, pool, episodes)
    monkeypatch.setattr(runner, "EPISODES_PER_BATCH", 3)
    fitted = []

    def factory():
        fitted.append(NearestCentroid())
        return fitted[-1]

    chunked = evaluate_frozen(factory, features, pool, episodes)
    assert len(fitted) == 3  # 3 + 3 + 1 episodes
    np.testing.assert_allclose(chunked.logits, whole.logits)
    np.testing.assert_array_equal(chunked.labels, whole.labels)


def test_mismatched_episodes_are_refused():
    pool, features = _pool()
    episodes = sample_episodes(pool, 2, 1, 5, 3, seed=0)
    with pytest.raises(DataError, match="drawn from"):
        evaluate_frozen(NearestCentroid, features, dataclasses.replace(pool, split="val"), episodes)
    other_pool, other_features = _pool(counts=(30, 30, 30))  # same data name, other rows
    with pytest.raises(DataError, match="rows are not images of its classes"):
        evaluate_frozen(NearestCentroid, other_features, other_pool, sample_episodes(pool, 3, 5, 15, 20, 0))
    with pytest.raises(DataError, match="rows but the test pool holds"):
        evaluate_frozen(NearestCentroid, features[:-1], pool, episodes)
    with pytest.raises(ValueError, match="evaluate_images"):
        evaluate_frozen(ImageCentroid, features, pool, episodes)


def test_images_runner():
    pool, _ = _pool()
    episodes = sample_episodes(pool, 3, 2, 5, 4, seed=0)

    def to_input(images):
        return torch.as_tensor(images).permute(0, 3, 1, 2).float() / 255

    for images in (pool.images, torch.from_numpy(pool.images)):
        results = evaluate_images(ImageCentroid, images, pool, episodes, to_input)
        assert len(results) == 4 and results.summary()["accuracy"] == (1.0, 0.0)
    with pytest.raises(ValueError, match="evaluate_frozen"):
        evaluate_images(NearestCentroid, pool.images, pool, episodes, to_input)


def _gaussian(n_per_class, means, rng, noise=1.0):
    labels = np.repeat(np.arange(len(means)), n_per_class)
    return torch.tensor(
        means[labels] + noise * rng.normal(size=(len(labels), means.shape[1])), dtype=torch.float32
    ), labels


def test_generalised_metrics():
    rng = np.random.default_rng(0)
    means = 4.0 * rng.normal(size=(7, 8))  # 4 base + 3 novel classes
    base_train, base_train_labels = _gaussian(40, means[:4], rng)
    base_test, base_test_labels = _gaussian(10, means[:4], rng)
    pool, _ = _pool()
    novel_features = torch.tensor(
        means[4 + pool.labels] + rng.normal(size=(len(pool), 8)), dtype=torch.float32
    )
    episodes = sample_episodes(pool, 3, 1, 5, 8, seed=0)

    def run(**kwargs):
        return evaluate_generalised(
            NearestCentroid, base_train, base_train_labels, base_test, base_test_labels,
            novel_features, pool, episodes, base_shots=20, base_queries=6, **kwargs,
        )  # fmt: skip

    results = run()
    assert len(results) == 8 and list(results.summary()) == list(GENERALISED_METRICS)
    for a, r, h in zip(*(results.metrics[name] for name in GENERALISED_METRICS), strict=True):
        assert 0 <= a <= 1 and 0 <= r <= 1 and 0 <= h <= 1
        assert h == pytest.approx(2 * a * r / (a + r) if a + r else 0.0)
    assert results.logits.shape == (8, 4 * 6 + 3 * 5, 7)
    np.testing.assert_array_equal(results.labels[0][:24], np.repeat(np.arange(4), 6))
    assert set(results.labels[0][24:]) == {4, 5, 6}
    assert results.summary()["base_accuracy"][0] > 0.8  # well-separated means
    prefix = run(n_episodes=3)
    assert len(prefix) == 3
    for name in GENERALISED_METRICS:
        np.testing.assert_array_equal(prefix.metrics[name], results.metrics[name][:3])
    assert not np.array_equal(run(seed=1).logits, results.logits)


def test_oracle_beats_one_shot_nearest_centroid():
    rng = np.random.default_rng(0)
    means = 1.5 * rng.normal(size=(3, 16)) + 2.0
    pool_features, pool_labels = _gaussian(30, means, rng, noise=1.5)
    train_features, train_labels = _gaussian(60, means, rng, noise=1.5)
    pool, _ = _pool(counts=(30, 30, 30))
    assert np.array_equal(pool.labels, pool_labels)
    episodes = sample_episodes(pool, 3, 1, 15, 40, seed=0)
    few_shot = evaluate_frozen(NearestCentroid, pool_features, pool, episodes)
    oracle = evaluate_oracle(train_features, train_labels, pool_features, pool, episodes)
    assert oracle.method == "oracle" and len(oracle) == 40 and oracle.probs[0].shape == (45, 3)
    for a, b in zip(oracle.labels, few_shot.labels, strict=True):
        np.testing.assert_array_equal(a, b)  # the same query sets
    diff, half_width = paired_difference_ci95(oracle.values("accuracy"), few_shot.values("accuracy"))
    assert diff - half_width > 0
    # 2-way episodes from 3 classes: the probe's logits for the episode's two classes only
    two_way = evaluate_oracle(
        train_features, train_labels, pool_features, pool, sample_episodes(pool, 2, 1, 5, 3, 0)
    )
    assert two_way.probs[0].shape == (10, 2)
    with pytest.raises(DataError, match="cover exactly"):
        evaluate_oracle(train_features[:60], train_labels[:60], pool_features, pool, episodes)


def test_oracle_two_classes():
    rng = np.random.default_rng(1)
    means = 3.0 * rng.normal(size=(2, 8))
    pool_features, _ = _gaussian(20, means, rng)
    train_features, train_labels = _gaussian(20, means, rng)
    pool, _ = _pool(counts=(20, 20))
    oracle = evaluate_oracle(
        train_features, train_labels, pool_features, pool, sample_episodes(pool, 2, 1, 5, 3, 0)
    )
    assert oracle.probs[0].shape == (10, 2) and oracle.summary()["accuracy"][0] > 0.9


@pytest.mark.parametrize("dim", [2, 64])  # 2: queries gathered per episode; 64: the pool scored once
def test_batched_logits_equal_one_fit_per_episode(dim):
    rng = np.random.default_rng(dim)
    pool, _ = _pool()
    features = torch.tensor(rng.normal(size=(len(pool), dim)), dtype=torch.float32)
    episodes = sample_episodes(pool, 3, 2, 5, 6, seed=0)
    results = evaluate_frozen(lambda: create_method("protonet", MethodContext()), features, pool, episodes)
    lookup = {row: position for position, row in enumerate(pool.indices)}
    for index, episode in enumerate(episodes.episodes):
        support = features[[lookup[row] for row in episode.support_rows()]]
        query = features[[lookup[row] for row in episode.query_rows()]]
        method = create_method("protonet", MethodContext()).fit(
            support, torch.tensor(episode.support_labels())
        )
        np.testing.assert_allclose(results.logits[index], method.predict_logits(query).double(), rtol=1e-5)


def test_episodewise_runner_sees_each_episode_and_matches_the_batched_one():
    pool, features = _pool(seed=3)
    features = features + torch.randn_like(features) * 6  # overlapping classes: not every query right
    episodes = sample_episodes(pool, n_way=3, k_shot=2, n_query=5, n_episodes=9, seed=2)
    seen = []

    def classify(support, labels, queries):
        seen.append((support.shape, labels.tolist(), queries.shape))
        return NearestCentroid().fit(support.unsqueeze(0), labels.unsqueeze(0)).predict_logits(queries)[0]

    one_by_one = runner.evaluate_episodewise(classify, features, pool, episodes, label="peer")
    batched = evaluate_frozen(NearestCentroid, features, pool, episodes)
    assert seen == [(torch.Size([6, 8]), [0, 0, 1, 1, 2, 2], torch.Size([15, 8]))] * 9
    assert one_by_one.method == "peer" and 0 < one_by_one.summary()["accuracy"][0] < 1
    np.testing.assert_allclose(one_by_one.logits, batched.logits, rtol=1e-6)
    np.testing.assert_array_equal(one_by_one.class_ids, batched.class_ids)


def test_episodes_with_non_finite_logits_are_failed_not_fatal():
    rng = np.random.default_rng(0)
    logits, labels = rng.normal(size=(6, 15, 3)), rng.integers(0, 3, (6, 15))
    broken = logits.copy()
    broken[2, 4] = np.nan  # e.g. a Sinkhorn iteration that divided 0 by 0
    results = runner.score_episodes("m", 5, broken, labels)
    intact = runner.score_episodes("m", 5, np.delete(logits, 2, axis=0), np.delete(labels, 2, axis=0))
    assert results.n_failed == 1 and intact.n_failed == 0
    for name, values in results.metrics.items():
        assert np.isnan(values[2])
        np.testing.assert_allclose(np.delete(values, 2), intact.metrics[name])
    assert results.summary() == intact.summary()  # pooled ECE and intervals over the 5 finite episodes
    assert np.isnan(
        runner.score_episodes("m", 5, np.full((2, 3, 3), np.nan), labels[:2, :3]).metrics["nll"]
    ).all()
