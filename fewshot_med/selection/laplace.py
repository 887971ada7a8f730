"""Bayesian multinomial logistic regression on frozen features, under the Laplace approximation,
solved exactly and for many episodes at once in the dual (kernel) space.

The model: logits ``Wᵀx̃`` with ``x̃ = [x, 1]`` (the bias is a weight on a constant feature), prior
``W ~ N(0, λ⁻¹ I)``, softmax likelihood. Everything a Laplace approximation needs reduces to
``(n·C, n·C)`` matrices (``n`` support points, ``C`` classes) instead of ``(D+1)·C`` squared:

- the MAP weights are ``W = X̃ᵀA`` with ``A = (Y - P)/λ`` (``solve_dual`` with ``C = 1/λ``);
- with ``J`` the Jacobian of the support logits in ``W`` (``JJᵀ = K̃ ⊗ I_C``, ``K̃ = X̃X̃ᵀ``) and ``G``
  block-diagonal of the softmax Jacobians, the posterior precision is ``H = λI + JᵀGJ`` and the
  matrix determinant lemma gives ``log det H = P·log λ + log det(I + G(K̃ ⊗ I)/λ)``; the ``P·log λ``
  cancels against the prior's normaliser, so the log evidence is
  ``log p(D) ≈ Σ log p(y_i | W*) - λ/2·‖W*‖² - ½·log det(I + G(K̃ ⊗ I)/λ)`` (MacKay, "The Evidence
  Framework Applied to Classification Networks", Neural Computation 1992);
- the push-through identity gives the logit covariance of a query ``x̃*`` with kernel row ``k*``:
  ``Σ* = (‖x̃*‖²·I - (k*ᵀ ⊗ I)(λI + G(K̃ ⊗ I))⁻¹G(k* ⊗ I)) / λ``, and the predictive is the probit
  approximation ``softmax(μ* / √(1 + π/8 · diag Σ*))`` (as laplace-torch's ``link_approx="probit"``;
  Daxberger, Kristiadi, Immer, Eschenhagen, Bauer & Hennig, "Laplace Redux: Effortless Bayesian Deep
  Learning", NeurIPS 2021, on last-layer Laplace).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from fewshot_med.models.dual_logreg import newton_matrix, solve_dual
from fewshot_med.models.linalg import serial_batches, solve


@dataclass(frozen=True)
class LaplaceFit:
    """The Laplace posterior of ``E`` episodes' Bayesian logistic regressions (float64).

    Attributes:
        support: ``(E, n, D + 1)`` support features with the constant 1 appended.
        gram: ``(E, n, n)`` their Gram matrices ``K̃``.
        targets: ``(E, n, C)`` one-hot labels.
        dual_coef: ``(E, n, C)`` ``A``, the MAP weights being ``X̃ᵀA``.
        probs: ``(E, n, C)`` the MAP's support probabilities.
        prior_precision: ``λ``.
    """

    support: Tensor
    gram: Tensor
    targets: Tensor
    dual_coef: Tensor
    probs: Tensor
    prior_precision: float


def fit_laplace(
    features: Tensor, labels: Tensor, n_way: int, prior_precision: float, max_iter: int = 100
) -> LaplaceFit:
    """MAP fit and Laplace posterior for ``E`` episodes.

    Args:
        features: ``(E, n, D)`` support features (as the candidate transformed them).
        labels: ``(E, n)`` integer labels in ``[0, n_way)``; a class may be absent (its weights then
            stay at the prior's mean).
        n_way: ``C``.
        prior_precision: ``λ > 0``.
        max_iter: Newton iterations.
    """
    if not prior_precision > 0:
        raise ValueError(f"prior_precision must be > 0, got {prior_precision}")
    support = _augment(features)
    gram = support @ support.transpose(1, 2)
    targets = F.one_hot(labels, n_way).double()
    dual_coef, _, _ = solve_dual(gram, targets, 1.0 / prior_precision, intercept=False, max_iter=max_iter)
    probs = torch.softmax(gram @ dual_coef, dim=-1)
    return LaplaceFit(support, gram, targets, dual_coef, probs, float(prior_precision))


def log_evidence(fit: LaplaceFit) -> Tensor:
    """``(E,)`` Laplace log marginal likelihood ``log p(y_1..n | x_1..n)`` (see the module docstring)."""
    log_likelihood = (fit.targets * torch.log(fit.probs.clamp_min(1e-300))).sum(dim=(1, 2))
    weight_norm = (fit.dual_coef * (fit.gram @ fit.dual_coef)).sum(dim=(1, 2))  # ‖W*‖² = tr(AᵀK̃A)
    with serial_batches():  # slogdet is a batched LU too: the oneMKL race of fewshot_med.models.linalg
        _, log_det = torch.linalg.slogdet(newton_matrix(fit.gram, fit.probs, 1.0 / fit.prior_precision))
    return log_likelihood - 0.5 * fit.prior_precision * weight_norm - 0.5 * log_det


def logit_moments(fit: LaplaceFit, query: Tensor) -> tuple[Tensor, Tensor]:
    """Mean ``(E, q, C)`` and covariance ``(E, q, C, C)`` of the query logits under the Laplace posterior,
    for ``(E, q, D)`` query features."""
    queries = _augment(query)
    cross = queries @ fit.support.transpose(1, 2)  # k*, (E, q, n)
    mean = cross @ fit.dual_coef
    n_episodes, n, n_way = fit.probs.shape
    jac = torch.diag_embed(fit.probs) - fit.probs.unsqueeze(-1) * fit.probs.unsqueeze(-2)  # (E, n, C, C)
    block = torch.einsum("eicd,ij->eicjd", jac, torch.eye(n, dtype=jac.dtype, device=jac.device))
    block = block.reshape(n_episodes, n * n_way, n * n_way)
    # (λI + G(K̃⊗I))⁻¹G = (I + G(K̃⊗I)/λ)⁻¹ G/λ
    system = newton_matrix(fit.gram, fit.probs, 1.0 / fit.prior_precision)
    factor = solve(system, block / fit.prior_precision).reshape(n_episodes, n, n_way, n, n_way)
    reduction = torch.einsum("eqi,eicjd,eqj->eqcd", cross, factor, cross)
    identity = torch.eye(n_way, dtype=mean.dtype, device=mean.device)
    self_kernel = queries.square().sum(dim=-1)[..., None, None]
    return mean, (self_kernel * identity - reduction) / fit.prior_precision


def predictive_log_probs(fit: LaplaceFit, query: Tensor, link: str = "probit") -> Tensor:
    """``(E, q, C)`` log predictive probabilities of ``(E, q, D)`` query features: ``probit``, the
    Bayesian model average under the probit approximation, or ``map``, the plug-in MAP softmax."""
    if link == "map":
        return torch.log_softmax(_augment(query) @ fit.support.transpose(1, 2) @ fit.dual_coef, dim=-1)
    if link != "probit":
        raise ValueError(f"link must be 'probit' or 'map', got {link!r}")
    mean, covariance = logit_moments(fit, query)
    variance = covariance.diagonal(dim1=-2, dim2=-1).clamp_min(0.0)
    return torch.log_softmax(mean / torch.sqrt(1.0 + math.pi / 8.0 * variance), dim=-1)


def _augment(features: Tensor) -> Tensor:
    """``(..., D)`` -> float64 ``(..., D + 1)`` with a constant 1 appended (the bias feature)."""
    features = features.double()
    return torch.cat([features, torch.ones_like(features[..., :1])], dim=-1)
