"""Transductive methods (BD-CSPN, TIM / alpha-TIM, PT-MAP) against hand computation, and the feature
transforms every frozen-feature method may take."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from torch import Tensor

from fewshot_med.data import ClassSubset
from fewshot_med.data.episodes import sample_episodes
from fewshot_med.evaluation import evaluate_frozen
from fewshot_med.methods import METHODS, MethodContext, create_method
from fewshot_med.methods.pt_map import sinkhorn
from fewshot_med.methods.tim import alpha_entropy
from fewshot_med.models.feature_transforms import FEATURE_TRANSFORMS, power_transform

DIM = 16
TRANSDUCTIVE = ("bd_cspn", "tim", "pt_map")
FAST = {"tim": {"steps": 20}, "pt_map": {"steps": 5, "sinkhorn_iterations": 20}}


@pytest.fixture(scope="module")
def context() -> MethodContext:
    return MethodContext(base_feature_mean=torch.full((DIM,), 0.5), seed=0)


def episodes(n_episodes: int = 4, n_way: int = 3, k_shot: int = 2, n_query: int = 5, seed: int = 0):
    """``(support, labels, query, query_labels)`` of ``E`` episodes: ReLU'd Gaussian clusters."""
    generator = torch.Generator().manual_seed(seed)
    centres = 1.5 * torch.randn(n_episodes, n_way, DIM, generator=generator)

    def draw(per_class: int) -> tuple[Tensor, Tensor]:
        labels = torch.arange(n_way).repeat_interleave(per_class).expand(n_episodes, -1)
        index = labels.unsqueeze(-1).expand(-1, -1, DIM)
        noise = torch.randn(n_episodes, n_way * per_class, DIM, generator=generator)
        return torch.relu(centres.gather(1, index) + noise), labels.contiguous()

    return (*draw(k_shot), *draw(n_query))


def test_the_transductive_methods_are_declared_and_the_others_are_not() -> None:
    assert {name for name, cls in METHODS.items() if cls.transductive} == set(TRANSDUCTIVE)


@pytest.mark.parametrize("name", TRANSDUCTIVE)
def test_a_query_logits_depend_on_the_other_queries(name: str, context: MethodContext) -> None:
    support, labels, query, _ = episodes(n_episodes=1)
    method = create_method(name, context, **FAST.get(name, {})).fit(support, labels)
    alone = method.predict_logits(query[:, :6])[:, :3]
    together = method.predict_logits(query)[:, :3]
    assert not torch.allclose(alone, together)


@pytest.mark.parametrize("name", TRANSDUCTIVE)
def test_batched_episodes_equal_one_at_a_time_and_stay_finite(name: str, context: MethodContext) -> None:
    support, labels, query, _ = episodes()
    params = FAST.get(name, {})
    batched = create_method(name, context, **params).fit(support, labels).predict_logits(query)
    for e in range(len(support)):
        single = create_method(name, context, **params).fit(support[e], labels[e]).predict_logits(query[e])
        torch.testing.assert_close(batched[e], single, rtol=1e-4, atol=1e-4)
    assert torch.isfinite(batched).all()


@pytest.mark.parametrize("name", TRANSDUCTIVE)
def test_shared_queries_are_inferred_over_in_every_episode(name: str, context: MethodContext) -> None:
    support, labels, query, _ = episodes()
    method = create_method(name, context, **FAST.get(name, {})).fit(support, labels)
    shared = method.predict_logits(query[0])
    expanded = method.predict_logits(query[0].expand(len(support), -1, -1))
    torch.testing.assert_close(shared, expanded)


@pytest.mark.parametrize("name", TRANSDUCTIVE)
@pytest.mark.parametrize("features", ["raw", "centred", "power"])
def test_no_nan_on_raw_or_negative_features(name: str, features: str, context: MethodContext) -> None:
    support, labels, query, _ = episodes()
    support, query = 50 * (support - 1), 50 * (query - 1)  # large and negative entries
    method = create_method(name, context, features=features, **FAST.get(name, {}))
    assert torch.isfinite(method.fit(support, labels).predict_logits(query)).all()


def test_bd_cspn_matches_a_hand_computed_episode(context: MethodContext) -> None:
    support, labels, query, _ = episodes(n_episodes=1)
    s, q, y = F.normalize(support[0], dim=-1), F.normalize(query[0], dim=-1), labels[0]
    q = q + s.mean(0) - q.mean(0)
    prototypes = torch.stack([s[y == c].mean(0) for c in range(3)])

    def cos(a: Tensor, b: Tensor) -> Tensor:
        return 10 * F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T

    pseudo = cos(q, prototypes).argmax(1)
    rectified = []
    for c in range(3):
        members = torch.cat([s[y == c], q[pseudo == c]])
        weights = cos(members, prototypes)[:, c].exp()
        rectified.append((weights[:, None] * members).sum(0) / weights.sum())
    expected = cos(q, torch.stack(rectified))
    logits = create_method("bd_cspn", context).fit(support[0], labels[0]).predict_logits(query[0])
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


def test_alpha_entropy_is_tsallis_and_tends_to_shannon() -> None:
    probs = torch.tensor([[0.7, 0.2, 0.1], [1 / 3, 1 / 3, 1 / 3]])
    shannon = -(probs * probs.log()).sum(-1)
    torch.testing.assert_close(alpha_entropy(probs, 1.0), shannon)
    torch.testing.assert_close(alpha_entropy(probs, 1.0 + 1e-4), shannon, rtol=1e-3, atol=1e-3)
    expected = (1 - (probs**2).sum(-1)) / (2 - 1)
    torch.testing.assert_close(alpha_entropy(probs, 2.0), expected)


def test_tim_descends_its_objective_from_the_prototypes(context: MethodContext) -> None:
    support, labels, query, _ = episodes(n_episodes=1)
    start = create_method("tim", context, steps=1, lr=1e-12).fit(support, labels)
    start.predict_logits(query)
    prototypes = F.normalize(support[0], dim=-1).reshape(3, 2, DIM).mean(1)
    torch.testing.assert_close(start.weights_[0], prototypes, rtol=1e-5, atol=1e-5)
    tim = create_method("tim", context, steps=50).fit(support, labels)
    logits = tim.predict_logits(query)
    probs = logits.softmax(-1)
    start_probs = start.predict_logits(query).softmax(-1)
    # more confident queries and no collapse of the marginal: the two entropy terms at work
    assert alpha_entropy(probs, 1.0).mean() < alpha_entropy(start_probs, 1.0).mean()
    assert alpha_entropy(probs.mean(1), 1.0).item() > 0.9 * math.log(3)


def test_sinkhorn_meets_both_marginals() -> None:
    scores = 5 * torch.randn(2, 9, 3, generator=torch.Generator().manual_seed(1))
    plan = sinkhorn(scores, torch.full((2, 3), 3.0), 200)
    torch.testing.assert_close(plan.sum(2), torch.ones(2, 9))
    torch.testing.assert_close(plan.sum(1), torch.full((2, 3), 3.0), rtol=1e-3, atol=1e-3)


def test_pt_map_logits_are_log_soft_assignments(context: MethodContext) -> None:
    support, labels, query, query_labels = episodes()
    logits = create_method("pt_map", context).fit(support, labels).predict_logits(query)
    torch.testing.assert_close(logits.exp().sum(-1), torch.ones(logits.shape[:2]), rtol=1e-4, atol=1e-4)
    assert (logits.argmax(-1) == query_labels).float().mean() > 0.8


def test_power_transform_is_sign_safe_and_unit_norm() -> None:
    x = torch.tensor([[4.0, -9.0, 0.0]])
    expected = F.normalize(torch.tensor([[2.0, -3.0, 0.0]]), dim=-1)  # sign(0) = 0
    torch.testing.assert_close(power_transform(x), expected, rtol=1e-4, atol=1e-4)
    assert set(FEATURE_TRANSFORMS) >= {"raw", "l2", "centred", "power"}


def test_logreg_on_raw_features_is_scikit_learns_probe(context: MethodContext) -> None:
    support, labels, query, _ = episodes(n_episodes=1, k_shot=5)
    logits = (
        create_method("logreg", context, features="raw").fit(support[0], labels[0]).predict_logits(query[0])
    )
    model = LogisticRegression(solver="newton-cg", tol=1e-12).fit(support[0].numpy(), labels[0].numpy())
    np.testing.assert_allclose(torch.softmax(logits, 1), model.predict_proba(query[0].numpy()), atol=1e-5)


@pytest.mark.parametrize("name", ["logreg", "r2d2", *TRANSDUCTIVE])
def test_centred_features_need_the_base_mean(name: str) -> None:
    with pytest.raises(Exception, match="needs the base-class mean feature"):
        create_method(name, MethodContext(), features="centred")


def test_evaluate_frozen_gives_a_transductive_method_each_episode_own_queries(context: MethodContext) -> None:
    """A pool small enough that inductive methods score it whole must still give BD-CSPN per-episode
    query sets: its logits equal a fit on each episode's own queries."""
    labels = np.repeat(np.arange(3), 8)
    noise = torch.randn(24, DIM, generator=torch.Generator().manual_seed(0))
    features = torch.relu(noise + torch.as_tensor(labels, dtype=torch.float32)[:, None])
    images = np.zeros((24, 1, 1, 1), np.uint8)
    pool = ClassSubset(images, labels, np.arange(24), ("a", "b", "c"), "test", "digest")
    episode_list = sample_episodes(pool, 3, 2, 4, 5, seed=0)
    factory = lambda: create_method("bd_cspn", context)  # noqa: E731
    results = evaluate_frozen(factory, features, pool, episode_list)
    arrays = episode_list.arrays
    for e in range(len(episode_list)):
        support = features[torch.as_tensor(arrays.support_rows[e])]
        query = features[torch.as_tensor(arrays.query_rows[e])]
        expected = factory().fit(support, torch.as_tensor(arrays.support_labels[e])).predict_logits(query)
        np.testing.assert_allclose(results.logits[e], expected.double().numpy(), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="inductive method"):
        evaluate_frozen(factory, features, pool, episode_list, leave_one_out=True)
