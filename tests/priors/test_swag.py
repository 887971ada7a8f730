"""SWAG moments, sampling and storage, checked against numpy, the paper's formulas and a known posterior."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from fewshot_med.priors import VARIANCE_FLOOR, SwagCollector, SwagPosterior


class Tiny(nn.Module):
    """Two trainable parameters (P = 8), a frozen one and a batch-norm (whose buffers are not parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(2, 3))
        self.frozen = nn.Parameter(torch.zeros(4), requires_grad=False)
        self.norm = nn.BatchNorm1d(1, affine=False)
        self.bias = nn.Parameter(torch.zeros(2))


def collect_sequence(thetas: np.ndarray, rank: int) -> SwagCollector:
    """Set ``Tiny``'s trainable parameters to each row of ``thetas`` ``(T, 8)`` and snapshot it."""
    module, collector = Tiny(), SwagCollector(rank)
    for theta in thetas:
        with torch.no_grad():
            module.weight.copy_(torch.from_numpy(theta[:6]).reshape(2, 3))
            module.bias.copy_(torch.from_numpy(theta[6:]))
            module.frozen.add_(1.0)
            module.norm.running_mean.add_(1.0)
        collector.collect(module)
    return collector


def running_deviations(thetas: np.ndarray) -> np.ndarray:
    """θ_i - θ̄_i with θ̄_i the mean of the first i rows, computed in float64."""
    counts = np.arange(1, len(thetas) + 1)[:, None]
    return thetas - np.cumsum(thetas, axis=0) / counts


def test_moments_equal_numpy_and_cover_only_trainable_parameters():
    thetas = np.random.default_rng(0).normal(size=(7, 8)).astype(np.float32).astype(np.float64)
    posterior = collect_sequence(thetas, rank=20).posterior()
    assert posterior.names == ("weight", "bias") and posterior.shapes == ((2, 3), (2,))
    assert posterior.n_snapshots == 7 and posterior.rank == 7
    assert posterior.mean.dtype == posterior.variance.dtype == posterior.deviations.dtype == torch.float32
    np.testing.assert_allclose(posterior.mean.numpy(), thetas.mean(axis=0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(posterior.variance.numpy(), thetas.var(axis=0), rtol=1e-5)
    np.testing.assert_allclose(posterior.deviations.numpy(), running_deviations(thetas), rtol=1e-5, atol=1e-6)
    parts = posterior.unflatten(posterior.mean)
    assert list(parts) == ["weight", "bias"] and parts["weight"].shape == (2, 3)
    np.testing.assert_allclose(parts["weight"].numpy(), thetas[:, :6].mean(axis=0).reshape(2, 3), rtol=1e-6)


def test_rank_keeps_the_last_deviations_and_the_moments_of_all_snapshots():
    thetas = np.random.default_rng(1).normal(size=(6, 8))
    posterior = collect_sequence(thetas, rank=2).posterior()
    assert posterior.rank == 2 and posterior.n_snapshots == 6
    np.testing.assert_allclose(posterior.deviations.numpy(), running_deviations(thetas)[-2:], atol=1e-6)
    np.testing.assert_allclose(posterior.mean.numpy(), thetas.mean(axis=0), atol=1e-6)


def test_small_variance_of_a_large_weight_is_accurate_and_a_constant_one_is_floored():
    rng = np.random.default_rng(2)
    thetas = np.ones((50, 8)) + 1e-4 * rng.normal(size=(50, 8))  # float32 moments would cancel here
    thetas[:, 7] = 0.5
    posterior = collect_sequence(thetas.astype(np.float32).astype(np.float64), rank=5).posterior()
    np.testing.assert_allclose(posterior.variance[:7].numpy(), thetas[:, :7].var(axis=0), rtol=1e-3)
    assert posterior.variance[7].item() == pytest.approx(VARIANCE_FLOOR)


def expected_covariance(posterior: SwagPosterior, scale: float) -> np.ndarray:
    """scale·(½·diag(σ²) + ½·DᵀD/(K - 1)), Maddox et al. (2019), eq. (1)-(2)."""
    deviations = posterior.deviations.double().numpy()
    low_rank = deviations.T @ deviations / (posterior.rank - 1)
    return scale * 0.5 * (np.diag(posterior.variance.double().numpy()) + low_rank)


def small_posterior() -> SwagPosterior:
    """P = 5, K = 3: diagonal and low-rank parts of comparable size."""
    module, collector = nn.Linear(4, 1), SwagCollector(rank=3)
    rng = np.random.default_rng(3)
    for _ in range(6):
        with torch.no_grad():
            for p in module.parameters():
                p.copy_(torch.from_numpy(rng.normal(size=p.shape)))
        collector.collect(module)
    return collector.posterior()


def test_sample_is_the_papers_formula():
    posterior = small_posterior()
    generator = torch.Generator().manual_seed(0)
    drawn = posterior.sample(scale=0.3, generator=generator)
    generator.manual_seed(0)
    z1, z2 = torch.randn(5, generator=generator), torch.randn(3, generator=generator)
    noise = posterior.variance.sqrt() * z1 / math.sqrt(2) + z2 @ posterior.deviations / math.sqrt(2 * 2)
    torch.testing.assert_close(drawn, posterior.mean + math.sqrt(0.3) * noise)
    assert drawn.shape == (5,) and drawn.dtype == torch.float32
    assert torch.equal(posterior.sample(scale=0.0), posterior.mean)


@pytest.mark.parametrize("scale", [1.0, 0.25])
def test_samples_have_the_swag_covariance_scaled_by_scale(scale):
    posterior = small_posterior()
    generator = torch.Generator().manual_seed(1)
    samples = torch.stack([posterior.sample(scale, generator) for _ in range(40_000)]).double().numpy()
    expected = expected_covariance(posterior, scale)
    tolerance = 0.04 * np.abs(expected).max()
    np.testing.assert_allclose(np.cov(samples, rowvar=False), expected, atol=tolerance)
    np.testing.assert_allclose(samples.mean(axis=0), posterior.mean.numpy(), atol=tolerance)


def test_swag_of_constant_rate_sgd_on_a_noisy_quadratic_recovers_its_stationary_gaussian():
    """SGD with rate η on L(θ) = ½ Σ a_j (θ_j - θ*_j)² with gradient noise N(0, s²) is the AR(1) process
    θ' - θ* = (1 - η a)(θ - θ*) - η ε, whose stationary law has mean θ* and variance η s² / (a (2 - η a))."""
    a, optimum, lr, noise = torch.tensor([1.0, 4.0]), torch.tensor([1.0, -2.0]), 0.1, 1.0
    module = nn.Module()
    module.theta = nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.SGD(module.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(0)
    collector = SwagCollector(rank=20)
    for step in range(21_000):
        optimizer.zero_grad()
        loss = 0.5 * (a * (module.theta - optimum).square()).sum()
        loss.backward()
        module.theta.grad += noise * torch.randn(2, generator=generator)
        optimizer.step()
        if step >= 1_000:  # burn-in: about 30 time constants of the slower coordinate
            collector.collect(module)
    posterior = collector.posterior()
    torch.testing.assert_close(posterior.mean, optimum, atol=0.03, rtol=0)
    stationary = lr * noise**2 / (a * (2 - lr * a))
    torch.testing.assert_close(posterior.variance, stationary, rtol=0.15, atol=0)


def test_posterior_round_trips_through_torch_save_with_weights_only(tmp_path):
    posterior = small_posterior()
    torch.save(posterior.state_dict(), tmp_path / "posterior.pt")
    loaded = SwagPosterior.from_state_dict(torch.load(tmp_path / "posterior.pt", weights_only=True))
    assert (loaded.names, loaded.shapes, loaded.n_snapshots) == (
        posterior.names,
        posterior.shapes,
        posterior.n_snapshots,
    )
    for field in ("mean", "variance", "deviations"):
        assert torch.equal(getattr(loaded, field), getattr(posterior, field)), field


def test_collector_state_continues_bit_for_bit(tmp_path):
    thetas = np.random.default_rng(4).normal(size=(9, 8))
    whole = collect_sequence(thetas, rank=3)
    first = collect_sequence(thetas[:4], rank=3)
    torch.save(first.state_dict(), tmp_path / "collector.pt")
    resumed = SwagCollector(rank=3)
    resumed.load_state_dict(torch.load(tmp_path / "collector.pt", weights_only=True))
    module = Tiny()
    for theta in thetas[4:]:
        with torch.no_grad():
            module.weight.copy_(torch.from_numpy(theta[:6]).reshape(2, 3))
            module.bias.copy_(torch.from_numpy(theta[6:]))
        resumed.collect(module)
    expected, got = whole.posterior(), resumed.posterior()
    assert got.n_snapshots == 9
    for field in ("mean", "variance", "deviations"):
        assert torch.equal(getattr(got, field), getattr(expected, field)), field


def test_errors_say_what_is_wrong():
    collector = SwagCollector(rank=2)
    with pytest.raises(ValueError, match="at least 2 snapshots, 0 collected"):
        collector.posterior()
    collector.collect(nn.Linear(3, 2))
    with pytest.raises(ValueError, match="at least 2 snapshots, 1 collected"):
        collector.posterior()
    with pytest.raises(
        ValueError, match=r"parameters changed .*parameter 0: weight \[2, 3\] then weight \[2, 4\]"
    ):
        collector.collect(nn.Linear(4, 2))
    renamed = nn.Module()
    renamed.kernel, renamed.bias = nn.Parameter(torch.zeros(2, 3)), nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match=r"parameter 0: weight .* then kernel"):
        collector.collect(renamed)
    with pytest.raises(ValueError, match="2 parameters then 1"):
        collector.collect(nn.Linear(3, 2, bias=False))
    with pytest.raises(ValueError, match="no trainable floating-point parameters"):
        collector.collect(nn.ReLU())
    with pytest.raises(ValueError, match="rank must be at least 2"):
        SwagCollector(rank=1)
    with pytest.raises(ValueError, match="saved rank 2, this collector has 3"):
        SwagCollector(rank=3).load_state_dict(collector.state_dict())
    posterior = small_posterior()
    with pytest.raises(ValueError, match="scale must be ≥ 0"):
        posterior.sample(scale=-1.0)
    with pytest.raises(ValueError, match=r"expected shape \(5,\), got \(4,\)"):
        posterior.unflatten(torch.zeros(4))
    with pytest.raises(ValueError, match=r"deviations \(1, 5\) must have shape \(K, 5\), K ≥ 2"):
        SwagPosterior(
            posterior.mean, posterior.variance, posterior.deviations[:1], 6, posterior.names, posterior.shapes
        )
