"""Model-selection criteria computed from a support set alone, by registry name.

Each criterion scores a candidate (a feature transform is applied beforehand; the candidate's prior
precision is passed) on each of ``E`` episodes, higher meaning "predicted to generalise better", in
nats per support point so that scores are comparable across shots:

- ``clml``: the conditional log marginal likelihood ``log p(D≥m | D<m)`` of Lotfi, Izmailov, Benton,
  Goldblum & Wilson, "Bayesian Model Selection, the Marginal Likelihood, and Generalization", ICML
  2022, averaged over ``orderings`` random orderings of the support set. As they do for neural
  networks, the joint conditional is approximated by the product of the posterior predictives of the
  points of ``D≥m`` under the Laplace posterior fitted on ``D<m`` (here exact Laplace and the probit
  predictive, ``fewshot_med.selection.laplace``); ``m = round(conditioning · n)``, at least 1 and at
  most ``n - 1``.
- ``lml``: the Laplace log marginal likelihood ``log p(D)`` of the whole support set (MacKay 1992).
- ``loo``: leave-one-out cross-validation: the plug-in (MAP) log-likelihood of each support point under
  the fit on the other ``n - 1``.
- ``train_loss``: minus the training cross-entropy of the MAP fit on the whole support set.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from fewshot_med.selection.laplace import fit_laplace, log_evidence, predictive_log_probs


@dataclass(frozen=True)
class CriterionSettings:
    """Options of the criteria: ``orderings`` and ``conditioning`` (the fraction ``m/n``) of ``clml``,
    and the seed of its orderings."""

    orderings: int = 10
    conditioning: float = 0.8
    seed: int = 0


#: ``(features (E, n, D), labels (E, n), n_way, prior_precision, settings) -> (E,)`` scores.
Criterion = Callable[[Tensor, Tensor, int, float, CriterionSettings], Tensor]
CRITERIA: dict[str, Criterion] = {}


def register_criterion(name: str) -> Callable[[Criterion], Criterion]:
    """Add a criterion to ``CRITERIA`` under ``name``."""

    def decorator(criterion: Criterion) -> Criterion:
        CRITERIA[name] = criterion
        return criterion

    return decorator


@register_criterion("clml")
def conditional_log_marginal_likelihood(
    features: Tensor, labels: Tensor, n_way: int, prior_precision: float, settings: CriterionSettings
) -> Tensor:
    """``(E,)`` CLML per held-out point, averaged over random orderings (see the module docstring)."""
    n_episodes, n = _require_two(labels, "clml")
    m = min(max(round(settings.conditioning * n), 1), n - 1)
    generator = torch.Generator().manual_seed(settings.seed)
    orders = torch.argsort(torch.rand(n_episodes, settings.orderings, n, generator=generator), dim=-1)
    return _held_out(features, labels, orders.to(labels.device), m, n_way, prior_precision, "probit")


@register_criterion("lml")
def log_marginal_likelihood(
    features: Tensor, labels: Tensor, n_way: int, prior_precision: float, settings: CriterionSettings
) -> Tensor:
    """``(E,)`` Laplace log evidence of the support set, per point."""
    return log_evidence(fit_laplace(features, labels, n_way, prior_precision)) / labels.shape[1]


@register_criterion("loo")
def leave_one_out(
    features: Tensor, labels: Tensor, n_way: int, prior_precision: float, settings: CriterionSettings
) -> Tensor:
    """``(E,)`` mean plug-in log-likelihood of each support point under the MAP fit on the others."""
    n_episodes, n = _require_two(labels, "loo")
    # row i of `orders` puts point i last: (E, n, n)
    orders = torch.stack(
        [torch.cat([torch.arange(i), torch.arange(i + 1, n), torch.tensor([i])]) for i in range(n)]
    )
    return _held_out(
        features,
        labels,
        orders.to(labels.device).expand(n_episodes, n, n),
        n - 1,
        n_way,
        prior_precision,
        "map",
    )


@register_criterion("train_loss")
def negative_training_loss(
    features: Tensor, labels: Tensor, n_way: int, prior_precision: float, settings: CriterionSettings
) -> Tensor:
    """``(E,)`` minus the mean training cross-entropy of the MAP fit."""
    fit = fit_laplace(features, labels, n_way, prior_precision)
    return (fit.targets * torch.log(fit.probs.clamp_min(1e-300))).sum(dim=(1, 2)) / labels.shape[1]


def _require_two(labels: Tensor, name: str) -> tuple[int, int]:
    """``(E, n)``, refusing support sets of fewer than 2 points."""
    n_episodes, n = labels.shape
    if n < 2:
        raise ValueError(f"{name} needs at least 2 support points per episode")
    return n_episodes, n


def _held_out(
    features: Tensor, labels: Tensor, orders: Tensor, m: int, n_way: int, prior_precision: float, link: str
) -> Tensor:
    """``(E,)`` mean over the ``(E, R, n)`` orderings of the mean log predictive (``link``) of each
    ordering's points after the first ``m``, under the fit on those ``m``."""
    permuted, permuted_labels = _gather(features, orders), _gather(labels, orders)  # (E·R, n, ...)
    fit = fit_laplace(permuted[:, :m], permuted_labels[:, :m], n_way, prior_precision)
    held_out = predictive_log_probs(fit, permuted[:, m:], link=link)
    scores = held_out.gather(-1, permuted_labels[:, m:].unsqueeze(-1)).squeeze(-1).mean(dim=1)
    return scores.reshape(orders.shape[:2]).mean(dim=1)


def _gather(values: Tensor, orders: Tensor) -> Tensor:
    """Episode ``e``'s points in the orders ``orders[e, r]``: ``(E, n, ...)`` and ``(E, R, n)`` ->
    ``(E·R, n, ...)``."""
    n_episodes, n_orders, n = orders.shape
    index = orders.reshape(n_episodes, n_orders * n)
    if values.dim() == 3:
        picked = values.gather(1, index.unsqueeze(-1).expand(-1, -1, values.shape[-1]))
    else:
        picked = values.gather(1, index)
    return picked.reshape(n_episodes * n_orders, n, *values.shape[2:])
