"""The temperature-scaling solver behind ``fewshot_med.evaluation.calibration``: validation of the
solver parameters and of logits/labels, and the safeguarded Newton iteration on the inverse
temperature, vectorised over episodes (the maths is described in that module).

NumPy only, so that the calibration registry is cheap to import; scikit-learn, whose
``ConvergenceWarning`` is emitted, is imported only when a fit does not converge.
"""

from __future__ import annotations

import warnings
from numbers import Integral, Real
from typing import NamedTuple

import numpy as np

# --------------------------------------------------------------------------- validation


def _check_solver_params(t_min: object, t_max: object, tol: object, max_iter: object) -> None:
    """Raise ``ValueError`` naming the first invalid solver parameter."""
    for name, value in (("t_min", t_min), ("t_max", t_max), ("tol", tol)):
        if isinstance(value, bool) or not isinstance(value, Real) or not np.isfinite(value) or value <= 0:
            raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    if not t_min < t_max:  # type: ignore[operator]
        raise ValueError(f"t_min must be smaller than t_max, got t_min={t_min!r}, t_max={t_max!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, Integral) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive integer, got {max_iter!r}")


def _check_logits(logits: object, ndims: tuple[int, ...]) -> np.ndarray:
    """``logits`` as a finite float64 array with one of ``ndims`` dimensions and at least 2 classes."""
    array = np.asarray(logits)
    shapes = " or ".join({2: "(n, C)", 3: "(E, n, C)"}.get(d, f"{d}-D") for d in ndims)
    if array.ndim not in ndims:
        raise ValueError(f"logits must be {shapes}, got shape {array.shape}")
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise ValueError(f"logits must be real numbers, got dtype {array.dtype}")
    if array.size == 0 or array.shape[-1] < 2:
        raise ValueError(f"logits must be non-empty with at least 2 classes, got shape {array.shape}")
    array = array.astype(np.float64, copy=False)
    if not np.all(np.isfinite(array)):
        raise ValueError("logits must be finite (found NaN or inf)")
    return array


def _check_fit_inputs(
    logits: object, labels: object, ndims: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """Validated float64 logits ``(..., n, C)`` and int64 labels ``(..., n)`` in ``0 … C-1``."""
    z = _check_logits(logits, ndims)
    y = np.asarray(labels)
    if y.shape != z.shape[:-1]:
        raise ValueError(f"labels must have shape {z.shape[:-1]} to match logits {z.shape}, got {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {y.dtype}")
    n_classes = z.shape[-1]
    if y.min() < 0 or y.max() >= n_classes:
        raise ValueError(
            f"labels must lie in 0 … {n_classes - 1} for {n_classes} classes, "
            f"got values from {y.min()} to {y.max()}"
        )
    return z, y.astype(np.int64, copy=False)


# --------------------------------------------------------------------------- solver


class _Solution(NamedTuple):
    """Per-episode result of ``_solve_inverse_temperature``, each ``(E,)``."""

    beta: np.ndarray  # float64 inverse temperatures
    n_iter: np.ndarray  # int64 Newton/bisection iterations after the bound checks
    converged: np.ndarray  # bool: |dNLL/dβ| ≤ tolerance, bracket collapsed, or optimum at a bound
    at_bound: np.ndarray  # bool: the unconstrained optimum lies outside [1/t_max, 1/t_min]
    gradient: np.ndarray  # float64 dNLL/dβ at ``beta`` (last evaluated value)


def _nll_derivatives(
    z: np.ndarray, z_true: np.ndarray, beta: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean NLL of ``softmax(β z)`` and its first two derivatives in ``β``.

    Args:
        z: ``(E, n, C)`` logits.
        z_true: ``(E, n)`` logit of the true class.
        beta: ``(E,)`` inverse temperatures.

    Returns:
        ``(nll, dnll, d2nll)``, each ``(E,)``.
    """
    scaled = beta[:, None, None] * z
    top = scaled.max(axis=-1, keepdims=True)
    exp = np.exp(scaled - top)
    total = exp.sum(axis=-1)
    p = exp / total[..., None]
    log_norm = top[..., 0] + np.log(total)
    nll = np.mean(log_norm - beta[:, None] * z_true, axis=-1)
    expected = np.sum(p * z, axis=-1)
    dnll = np.mean(expected - z_true, axis=-1)
    d2nll = np.mean(np.sum(p * (z - expected[..., None]) ** 2, axis=-1), axis=-1)
    return nll, dnll, d2nll


def _solve_inverse_temperature(
    z: np.ndarray, y: np.ndarray, t_min: float, t_max: float, tol: float, max_iter: int
) -> _Solution:
    """Per-episode ``β`` in ``[1/t_max, 1/t_min]`` minimising the mean NLL of ``softmax(β z)``.

    Vectorised over episodes: each iteration evaluates the derivatives of all unfinished episodes
    at once. Convergence is ``|dNLL/dβ| ≤ tol · s`` with ``s`` the episode's mean logit range
    ``mean_i (max_j z_ij - min_j z_ij)`` (the derivative is bounded by it, so ``tol`` is relative),
    or a bracket shrunk to machine precision. An optimum outside the bounds is clipped to the nearer
    bound (``at_bound``). Episodes whose rows are all constant have a flat NLL; they keep ``β = 1``
    (clipped to the bounds) and count as converged.

    Args:
        z: ``(E, n, C)`` validated float64 logits.
        y: ``(E, n)`` validated int64 labels.
        t_min, t_max, tol, max_iter: validated solver parameters.

    Returns:
        A ``_Solution`` of ``(E,)`` arrays.
    """
    n_episodes = z.shape[0]
    z_true = np.take_along_axis(z, y[..., None], axis=-1)[..., 0]
    lower, upper = 1.0 / t_max, 1.0 / t_min
    threshold = tol * np.mean(z.max(axis=-1) - z.min(axis=-1), axis=-1)  # (E,)
    flat = threshold == 0.0

    _, grad_lower, _ = _nll_derivatives(z, z_true, np.full(n_episodes, lower))
    _, grad_upper, _ = _nll_derivatives(z, z_true, np.full(n_episodes, upper))
    below = ~flat & (grad_lower > threshold)  # NLL still rising at the smallest β: optimum below it
    above = ~flat & ~below & (grad_upper < -threshold)  # still falling at the largest β
    beta = np.where(below, lower, np.where(above, upper, np.clip(1.0, lower, upper)))
    gradient = np.where(below, grad_lower, np.where(above, grad_upper, 0.0))
    at_bound = below | above
    done = at_bound | flat
    converged = done.copy()
    n_iter = np.zeros(n_episodes, dtype=np.int64)
    lo = np.full(n_episodes, lower)  # bracket of the minimum, shrinking
    hi = np.full(n_episodes, upper)

    for _ in range(max_iter):
        active = np.flatnonzero(~done)
        if active.size == 0:
            break
        b = beta[active]
        _, g, h = _nll_derivatives(z[active], z_true[active], b)
        gradient[active] = g
        n_iter[active] += 1
        rising = g > 0
        lo[active] = np.where(rising, lo[active], b)
        hi[active] = np.where(rising, b, hi[active])
        a_lo, a_hi = lo[active], hi[active]
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            newton = b - g / h
        inside = np.isfinite(newton) & (h > 0) & (newton > a_lo) & (newton < a_hi)
        step = np.where(inside, newton, 0.5 * (a_lo + a_hi))
        finished = (np.abs(g) <= threshold[active]) | (a_hi - a_lo <= 4 * np.finfo(np.float64).eps * a_hi)
        beta[active] = np.where(finished, b, step)
        converged[active] = finished
        done[active] = finished
    return _Solution(beta, n_iter, converged, at_bound, gradient)


def _warn_not_converged(solution: _Solution, max_iter: int, what: str) -> None:
    failed = ~solution.converged
    if failed.any():
        from sklearn.exceptions import ConvergenceWarning  # imported here: sklearn takes seconds to import

        worst = float(np.max(np.abs(solution.gradient[failed])))
        warnings.warn(
            f"{what}: temperature scaling did not converge in max_iter={max_iter} iterations for "
            f"{int(failed.sum())} of {failed.size} fit(s) (largest |dNLL/dβ| = {worst:.3g}); "
            "increase max_iter or tol",
            ConvergenceWarning,
            stacklevel=3,
        )
