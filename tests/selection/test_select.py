"""Picking candidates, and the ``laplace_logreg`` method that picks from the support set alone."""

import pytest
import torch

from fewshot_med.errors import ConfigError
from fewshot_med.methods import METHODS, MethodContext, create_method
from fewshot_med.selection.candidates import Candidate, candidate_grid
from fewshot_med.selection.criteria import CriterionSettings
from fewshot_med.selection.laplace import fit_laplace, predictive_log_probs
from fewshot_med.selection.select import pick, score_candidates


def test_pick_per_episode_and_per_dataset_by_hand():
    # rows: candidates, columns: episodes
    scores = torch.tensor(
        [[0.0, 5.0, 1.0, 2.0, 3.0], [1.0, 1.0, float("nan"), 2.0, 3.0], [0.5, 0.0, 0.9, 10.0, 1.0]]
    )
    # episode 2: NaN never wins; episode 4: a tie goes to the first candidate
    assert pick(scores, "episode").tolist() == [1, 0, 0, 2, 0]
    # means 2.2, NaN, 2.48
    assert pick(scores, "dataset").tolist() == [2] * 5
    with pytest.raises(ValueError, match="per must be one of"):
        pick(scores, "fold")


def test_candidate_grid_and_its_errors():
    grid = candidate_grid(["raw", "l2"], [0.1, 1])
    assert [c.label for c in grid] == ["raw, λ=0.1", "raw, λ=1", "l2, λ=0.1", "l2, λ=1"]
    with pytest.raises(ValueError, match="features must be one of"):
        Candidate("pca", 1.0)
    with pytest.raises(ValueError, match="base-class mean"):
        Candidate("centred", 1.0).transform(torch.ones(2, 3))


def _support(n_episodes=6, k_shot=3, dim=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(3).repeat_interleave(k_shot).expand(n_episodes, -1)
    means = 3 * torch.randn(n_episodes, 3, dim, generator=generator)
    support = means.gather(1, labels.unsqueeze(-1).expand(-1, -1, dim)) + torch.randn(
        n_episodes, 3 * k_shot, dim, generator=generator
    )
    query = means.repeat_interleave(4, dim=1) + torch.randn(n_episodes, 12, dim, generator=generator)
    return support, labels, query


def test_laplace_logreg_is_registered_and_one_candidate_is_the_bayesian_average():
    assert "laplace_logreg" in METHODS
    support, labels, query = _support()
    method = create_method("laplace_logreg", MethodContext(), features="l2", prior_precision=0.5).fit(
        support, labels
    )
    expected = predictive_log_probs(
        fit_laplace(torch.nn.functional.normalize(support.double(), dim=-1), labels, 3, 0.5),
        torch.nn.functional.normalize(query.double(), dim=-1),
    )
    assert torch.allclose(method.predict_logits(query), expected.float(), atol=1e-6)
    assert torch.allclose(method.predict_logits(query).exp().sum(-1), torch.ones(6, 12))


@pytest.mark.parametrize("per", ["episode", "dataset"])
def test_laplace_logreg_uses_the_candidate_its_criterion_picks(per):
    support, labels, query = _support(seed=1)
    base_mean = torch.randn(8)
    params = {
        "features": ["raw", "l2", "centred"],
        "prior_precision": [0.01, 1.0, 100.0],
        "select_by": "loo",
        "select_per": per,
    }
    method = create_method(
        "laplace_logreg", MethodContext(base_feature_mean=base_mean, seed=3), **params
    ).fit(support, labels)
    candidates = candidate_grid(params["features"], params["prior_precision"])
    scores = score_candidates(
        support, labels, 3, candidates, ["loo"], CriterionSettings(seed=3), base_mean.double()
    )["loo"]
    assert torch.equal(method.choice_, pick(scores, per))
    if per == "dataset":
        assert method.choice_.unique().numel() == 1
    logits = method.predict_logits(query)
    for episode, index in enumerate(method.choice_.tolist()):
        candidate = candidates[index]
        fit = fit_laplace(
            candidate.transform(support[episode : episode + 1].double(), base_mean.double()),
            labels[episode : episode + 1],
            3,
            candidate.prior_precision,
        )
        alone = predictive_log_probs(
            fit, candidate.transform(query[episode : episode + 1].double(), base_mean.double())
        )
        assert torch.allclose(logits[episode], alone[0].float(), atol=1e-6)
    # queries shared by every episode (a pool) score like per-episode copies of them
    pool = query[0]
    assert torch.allclose(
        method.predict_logits(pool), method.predict_logits(pool.expand(6, -1, -1)), atol=1e-6
    )


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"features": ["raw", "pca"]}, "features"),
        ({"prior_precision": [1.0, 0.0]}, "prior_precision"),
        ({"select_by": "aic"}, "select_by"),
        ({"select_per": "fold"}, "select_per"),
        ({"conditioning": 1.0}, "conditioning"),
        ({"predictive": "mc"}, "predictive"),
        ({"features": "centred"}, "base-class mean"),
    ],
)
def test_laplace_logreg_refuses_bad_parameters(params, message):
    with pytest.raises(ConfigError, match=f"method 'laplace_logreg': .*{message}"):
        create_method("laplace_logreg", MethodContext(), **params)
