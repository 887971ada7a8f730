"""fewshot_med.models.linalg.solve: right answers where multi-threaded oneMKL's batched LU breaks
(100 float64 251 x 251 systems on 2 threads, the 7-way 5-shot logreg Newton systems), no oneMKL error
lines on stdout, and the old solver's answers elsewhere."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fewshot_med.models.linalg import serial_batches, solve


def _systems(n_batch: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Well-conditioned general and symmetric positive definite ``(n_batch, size, size)`` float64
    matrices and ``(n_batch, size, 7)`` right-hand sides."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(n_batch, size, size, dtype=torch.float64, generator=generator) / size**0.5
    general = 4 * torch.eye(size, dtype=torch.float64) + noise
    spd = general @ general.transpose(1, 2)
    rhs = torch.randn(n_batch, size, 7, dtype=torch.float64, generator=generator)
    return general, spd, rhs


@pytest.fixture
def two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def test_failing_size_on_two_threads_is_solved_without_mkl_noise(two_threads, capfd):
    general, spd, rhs = _systems(100, 251, seed=0)
    for matrices in (general, spd):
        x = solve(matrices, rhs)
        residual = (matrices @ x - rhs).abs().max().item()
        assert residual < 1e-12  # the race gave residuals of order 1 or failed
        reference = np.linalg.solve(matrices[:3].numpy(), rhs[:3].numpy())  # numpy is slow on all 100
        np.testing.assert_allclose(x[:3].numpy(), reference, rtol=1e-10, atol=1e-12)
    assert torch.get_num_threads() == 2  # restored
    out, err = capfd.readouterr()
    assert "MKL" not in out and "MKL" not in err


@pytest.mark.parametrize("size", [5, 29, 60])
def test_small_sizes_match_the_old_solver_and_numpy(size):
    general, spd, rhs = _systems(40, size, seed=size)
    for matrices in (general, spd):
        with serial_batches():  # the old solver, where it is right
            old = torch.linalg.solve(matrices, rhs)
        assert torch.equal(solve(matrices, rhs), old)  # the same LAPACK calls
        np.testing.assert_allclose(
            solve(matrices, rhs).numpy(),
            np.linalg.solve(matrices.numpy(), rhs.numpy()),
            rtol=1e-10,
            atol=1e-12,
        )
        vector = solve(matrices, rhs[..., 0])  # (E, m) right-hand sides
        np.testing.assert_allclose(vector.numpy(), old[..., 0].numpy(), rtol=1e-12, atol=1e-14)


def test_thread_count_is_restored_when_the_solve_raises():
    threads = torch.get_num_threads()
    with pytest.raises(RuntimeError, match="singular"):
        solve(torch.zeros(2, 3, 3, dtype=torch.float64), torch.ones(2, 3, 1, dtype=torch.float64))
    assert torch.get_num_threads() == threads
