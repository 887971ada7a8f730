"""The dual-space Laplace approximation against a dense one built with autograd."""

import math

import pytest
import torch

from fewshot_med.selection.laplace import fit_laplace, log_evidence, logit_moments, predictive_log_probs


def _episode(n_per_class: int = 3, n_way: int = 3, dim: int = 4, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n_way).repeat_interleave(n_per_class)
    centres = 2.0 * torch.randn(n_way, dim, generator=generator, dtype=torch.float64)
    features = centres[labels] + torch.randn(len(labels), dim, generator=generator, dtype=torch.float64)
    query = torch.randn(5, dim, generator=generator, dtype=torch.float64)
    return features, labels, query


def _dense(features, labels, n_way, precision):
    """MAP by Newton in the primal, then the Laplace evidence and the Hessian, with autograd."""
    x = torch.cat([features, torch.ones(len(features), 1, dtype=torch.float64)], dim=1)

    def negative_log_joint(flat):
        weights = flat.reshape(x.shape[1], n_way)
        log_probs = torch.log_softmax(x @ weights, dim=1)
        return -log_probs[torch.arange(len(labels)), labels].sum() + 0.5 * precision * flat.square().sum()

    flat = torch.zeros(x.shape[1] * n_way, dtype=torch.float64)
    for _ in range(50):
        gradient = torch.autograd.functional.jacobian(negative_log_joint, flat)
        hessian = torch.autograd.functional.hessian(negative_log_joint, flat)
        flat = flat - torch.linalg.solve(hessian, gradient)
    hessian = torch.autograd.functional.hessian(negative_log_joint, flat)
    n_params = flat.numel()
    evidence = (
        -negative_log_joint(flat)
        + 0.5 * n_params * math.log(precision)
        - 0.5 * torch.linalg.slogdet(hessian)[1]
    )
    return flat.reshape(x.shape[1], n_way), hessian, evidence


@pytest.mark.parametrize("precision", [0.1, 1.0, 10.0])
def test_evidence_and_logit_covariance_equal_the_dense_laplace(precision):
    features, labels, query = _episode()
    fit = fit_laplace(features[None], labels[None], 3, precision)
    weights, hessian, evidence = _dense(features, labels, 3, precision)
    assert torch.allclose(fit.support[0].T @ fit.dual_coef[0], weights, atol=1e-8)
    assert log_evidence(fit)[0].item() == pytest.approx(evidence.item(), abs=1e-7)
    mean, covariance = logit_moments(fit, query[None])
    q = torch.cat([query, torch.ones(len(query), 1, dtype=torch.float64)], dim=1)
    # flat parameters are W.reshape(-1), row-major over (feature, class): d logit_c / d W[f, c'] = q_f δ_cc'
    jacobians = torch.stack(
        [
            torch.stack(
                [torch.outer(q[i], torch.eye(3, dtype=torch.float64)[c]).reshape(-1) for c in range(3)]
            )
            for i in range(5)
        ]
    )
    dense_covariance = jacobians @ torch.linalg.inv(hessian) @ jacobians.transpose(1, 2)
    assert torch.allclose(mean[0], q @ weights, atol=1e-8)
    assert torch.allclose(covariance[0], dense_covariance, atol=1e-9)


def test_probit_predictive_is_a_tempered_map_softmax_and_map_link_is_plug_in():
    features, labels, query = _episode(seed=1)
    fit = fit_laplace(features[None], labels[None], 3, 1.0)
    mean, covariance = logit_moments(fit, query[None])
    kappa = 1 / torch.sqrt(1 + math.pi / 8 * covariance.diagonal(dim1=-2, dim2=-1))
    assert torch.allclose(predictive_log_probs(fit, query[None]), torch.log_softmax(kappa * mean, -1))
    assert torch.allclose(predictive_log_probs(fit, query[None], link="map"), torch.log_softmax(mean, -1))


def test_episodes_are_independent_and_absent_classes_stay_at_the_prior():
    a, la, qa = _episode(seed=2)
    b, lb, qb = _episode(seed=3)
    both = fit_laplace(torch.stack([a, b]), torch.stack([la, lb]), 3, 0.5)
    alone = fit_laplace(b[None], lb[None], 3, 0.5)
    assert torch.allclose(log_evidence(both)[1], log_evidence(alone)[0])
    assert torch.allclose(
        predictive_log_probs(both, torch.stack([qa, qb]))[1], predictive_log_probs(alone, qb[None])[0]
    )
    # class 2 unseen: a proper posterior still, which gives it the lowest probability on the support
    keep = la < 2
    fit = fit_laplace(a[keep][None], la[keep][None], 3, 1.0)
    probs = predictive_log_probs(fit, a[keep][None]).exp()[0]
    assert torch.isfinite(log_evidence(fit)).all()
    assert (probs[:, 2] < probs[:, :2].max(dim=1).values).all() and (probs[:, 2] < 1 / 3).all()


def test_prior_precision_must_be_positive():
    features, labels, _ = _episode()
    with pytest.raises(ValueError, match="prior_precision"):
        fit_laplace(features[None], labels[None], 3, 0.0)
