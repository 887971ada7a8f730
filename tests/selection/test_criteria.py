"""Selection criteria: each equals its definition computed by hand, and the CLML orders candidates
correctly where the answer is known."""

import math

import pytest
import torch

from fewshot_med.selection.criteria import CRITERIA, CriterionSettings
from fewshot_med.selection.laplace import fit_laplace, log_evidence, predictive_log_probs

N_WAY = 3


def _episodes(signal: float, n_episodes: int = 40, k_shot: int = 5, dim: int = 16, seed: int = 0):
    """Gaussian classes whose means are ``signal`` apart (0: the labels are noise)."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(N_WAY).repeat_interleave(k_shot).expand(n_episodes, -1)
    means = signal * torch.randn(n_episodes, N_WAY, dim, generator=generator, dtype=torch.float64)
    noise = torch.randn(n_episodes, N_WAY * k_shot, dim, generator=generator, dtype=torch.float64)
    return means.gather(1, labels.unsqueeze(-1).expand(-1, -1, dim)) + noise, labels


def test_clml_is_the_held_out_predictive_of_its_orderings():
    features, labels = _episodes(1.0, n_episodes=2)
    settings = CriterionSettings(orderings=3, conditioning=0.6, seed=7)
    scores = CRITERIA["clml"](features, labels, N_WAY, 0.5, settings)
    # the same orderings, drawn as the criterion draws them, scored one by one
    orders = torch.argsort(torch.rand(2, 3, 15, generator=torch.Generator().manual_seed(7)), dim=-1)
    m = 9
    expected = torch.zeros(2, dtype=torch.float64)
    for e in range(2):
        for r in range(3):
            order = orders[e, r]
            fit = fit_laplace(features[e, order[:m]][None], labels[e, order[:m]][None], N_WAY, 0.5)
            log_probs = predictive_log_probs(fit, features[e, order[m:]][None])[0]
            expected[e] += log_probs[torch.arange(15 - m), labels[e, order[m:]]].mean() / 3
    assert torch.allclose(scores, expected)


def test_loo_refits_without_each_point():
    features, labels = _episodes(1.0, n_episodes=2, k_shot=2)
    scores = CRITERIA["loo"](features, labels, N_WAY, 2.0, CriterionSettings())
    for e in range(2):
        held_out = []
        for i in range(6):
            keep = torch.arange(6) != i
            fit = fit_laplace(features[e, keep][None], labels[e, keep][None], N_WAY, 2.0)
            held_out.append(
                predictive_log_probs(fit, features[e, i][None, None], link="map")[0, 0, labels[e, i]]
            )
        assert scores[e].item() == pytest.approx(torch.stack(held_out).mean().item(), abs=1e-10)


def test_lml_and_training_loss_per_support_point():
    features, labels = _episodes(1.0, n_episodes=3)
    fit = fit_laplace(features, labels, N_WAY, 1.0)
    assert torch.allclose(
        CRITERIA["lml"](features, labels, N_WAY, 1.0, CriterionSettings()), log_evidence(fit) / 15
    )
    log_probs = predictive_log_probs(fit, features, link="map")
    expected = log_probs.gather(-1, labels.unsqueeze(-1)).squeeze(-1).mean(dim=1)
    assert torch.allclose(CRITERIA["train_loss"](features, labels, N_WAY, 1.0, CriterionSettings()), expected)


def test_clml_ranks_feature_sets_by_their_signal():
    """More separated classes generalise better; the CLML must order the candidates that way."""
    settings = CriterionSettings(orderings=5)
    means = [
        CRITERIA["clml"](*_episodes(signal), N_WAY, 1.0, settings).mean().item()
        for signal in (0.0, 0.5, 1.0, 2.0)
    ]
    assert means == sorted(means)
    assert means[0] == pytest.approx(-math.log(N_WAY), abs=0.15)  # labels that are noise: chance level


def test_clml_prefers_the_prior_that_generalises_where_training_loss_cannot():
    """With noise labels the training loss rewards the weakest prior (it memorises best), while any
    held-out criterion sees that a strong prior (predicting uniform) generalises best."""
    features, labels = _episodes(0.0, dim=32)
    precisions = [0.01, 1.0, 100.0]
    settings = CriterionSettings()

    def best(name: str) -> float:
        scores = [CRITERIA[name](features, labels, N_WAY, p, settings).mean() for p in precisions]
        return precisions[int(torch.stack(scores).argmax())]

    assert best("train_loss") == 0.01
    assert best("clml") == 100.0 and best("loo") == 100.0


def test_one_shot_episodes_are_scored_and_too_small_ones_refused():
    features, labels = _episodes(1.0, n_episodes=4, k_shot=1)
    for name in CRITERIA:
        assert torch.isfinite(CRITERIA[name](features, labels, N_WAY, 1.0, CriterionSettings())).all()
    with pytest.raises(ValueError, match="at least 2 support points"):
        CRITERIA["clml"](features[:, :1], labels[:, :1], N_WAY, 1.0, CriterionSettings())
