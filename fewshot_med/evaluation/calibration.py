"""Post-hoc calibration of logits: temperature scaling, pooled or one temperature per episode.

A calibrator follows scikit-learn's estimator contract: ``__init__`` only stores parameters, ``fit``
validates them and the ``(n, C)`` or ``(E, n, C)`` logits with their ``(n,)`` or ``(E, n)`` labels in
``0 … C-1`` and returns ``self``, learned state sits in attributes ending in ``_``. Calibrators map
logits to logits (``transform``); ``predict_proba`` applies the softmax.

Temperature scaling (Guo, Pleiss, Sun & Weinberger, "On Calibration of Modern Neural Networks",
ICML 2017) divides the logits by one temperature ``T`` fitted to minimise the mean negative
log-likelihood (NLL). In the inverse temperature ``β = 1/T`` the NLL
``mean_i [logsumexp_j(β z_ij) - β z_i,y_i]`` is convex: its derivative is
``mean_i (E_p[z_i] - z_i,y_i)`` and its second derivative ``mean_i Var_p[z_i] ≥ 0`` with
``p = softmax(β z_i)``. The solver is a safeguarded Newton iteration on ``β`` inside
``[1/t_max, 1/t_min]``: a Newton step that leaves the current bracket of the minimum is replaced by
bisection. It runs on a batch of episodes at once, one ``β`` each.

Few-shot episodes leave no held-out data, so two settings supply the fitting data:
``calibrate_with_val_episodes`` (one temperature from the method's predictions on val-split episodes)
and ``calibrate_with_support_leave_one_out`` (a temperature per episode from held-out predictions on
its own support set).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from numbers import Integral, Real
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.exceptions import ConvergenceWarning

from fewshot_med.evaluation.metrics import softmax
from fewshot_med.methods.base import NotFittedError

if TYPE_CHECKING:
    from typing_extensions import Self

    from fewshot_med.evaluation.runner import EpisodeResults

__all__ = [
    "CALIBRATION_SETTINGS",
    "TemperatureScaling",
    "calibrate_with_support_leave_one_out",
    "calibrate_with_val_episodes",
    "fit_episode_temperatures",
]


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
        worst = float(np.max(np.abs(solution.gradient[failed])))
        warnings.warn(
            f"{what}: temperature scaling did not converge in max_iter={max_iter} iterations for "
            f"{int(failed.sum())} of {failed.size} fit(s) (largest |dNLL/dβ| = {worst:.3g}); "
            "increase max_iter or tol",
            ConvergenceWarning,
            stacklevel=3,
        )


# --------------------------------------------------------------------------- public API


def fit_episode_temperatures(
    logits: np.ndarray,
    labels: np.ndarray,
    *,
    t_min: float = 0.05,
    t_max: float = 20.0,
    tol: float = 1e-10,
    max_iter: int = 100,
) -> np.ndarray:
    """One temperature per episode, each minimising that episode's mean NLL (Guo et al., ICML 2017).

    Fully vectorised over episodes (the same solver as ``TemperatureScaling``, which fits all samples
    as a single episode). With few samples the bounds matter: when every sample of an episode is
    classified correctly the NLL keeps falling as ``T → 0``, so that episode gets ``t_min``; when
    every true class has the lowest logit it gets ``t_max``.

    Args:
        logits: ``(E, n, C)`` logits of ``n`` samples in each of ``E`` episodes.
        labels: ``(E, n)`` integer labels in ``0 … C-1``.
        t_min: smallest temperature allowed, ``> 0``.
        t_max: largest temperature allowed, ``> t_min``.
        tol: convergence tolerance on ``|dNLL/dβ|`` (``β = 1/T``), relative to the episode's mean
            logit range ``mean_i (max_j z_ij - min_j z_ij)``.
        max_iter: most safeguarded Newton iterations per episode; a ``ConvergenceWarning`` is
            emitted for episodes still unconverged after them.

    Returns:
        ``(E,)`` float64 temperatures in ``[t_min, t_max]``; divide episode ``e``'s logits by entry
        ``e`` to calibrate them.

    Raises:
        ValueError: on a parameter out of range, or logits/labels of the wrong shape, type or range.
    """
    _check_solver_params(t_min, t_max, tol, max_iter)
    z, y = _check_fit_inputs(logits, labels, ndims=(3,))
    solution = _solve_inverse_temperature(z, y, float(t_min), float(t_max), float(tol), int(max_iter))
    _warn_not_converged(solution, int(max_iter), "fit_episode_temperatures")
    return np.clip(1.0 / solution.beta, t_min, t_max)


class TemperatureScaling(BaseEstimator):
    """Temperature scaling (Guo, Pleiss, Sun & Weinberger, "On Calibration of Modern Neural
    Networks", ICML 2017): logits are divided by one temperature ``T`` fitted to minimise the mean NLL.

    Dividing by ``T > 0`` never changes the predicted class. ``fit`` pools every sample (all episodes
    of ``(E, n, C)`` logits) and solves for ``β = 1/T`` by safeguarded Newton iteration, the NLL being
    convex in ``β``. The optimum is clipped to ``[t_min, t_max]``: when every sample is classified
    correctly, for instance, the NLL keeps falling as ``T → 0`` and ``T = t_min`` with ``at_bound_``.

    Args:
        t_min: smallest temperature allowed, ``> 0``.
        t_max: largest temperature allowed, ``> t_min``.
        tol: convergence tolerance on ``|dNLL/dβ|``, relative to the mean logit range
            ``mean_i (max_j z_ij - min_j z_ij)``.
        max_iter: most safeguarded Newton iterations; a ``ConvergenceWarning`` follows if they do not
            suffice.

    Attributes:
        temperature_: the fitted temperature ``T`` in ``[t_min, t_max]``.
        n_iter_: Newton/bisection iterations run (0 when the optimum is at a bound or the logits are
            constant along every row).
        converged_: whether ``|dNLL/dβ|`` reached the tolerance, or the optimum is at a bound.
        at_bound_: whether the unconstrained optimum lies outside ``[t_min, t_max]`` (``T`` is clipped).
        nll_before_: mean NLL of the uncalibrated logits (``T = 1``) on the fitting samples.
        nll_after_: mean NLL after dividing by ``temperature_``.
    """

    def __init__(
        self, t_min: float = 0.05, t_max: float = 20.0, tol: float = 1e-10, max_iter: int = 100
    ) -> None:
        self.t_min = t_min
        self.t_max = t_max
        self.tol = tol
        self.max_iter = max_iter

    def fit(self, logits: np.ndarray, labels: np.ndarray) -> Self:
        """Fit the temperature on all samples.

        Args:
            logits: ``(n, C)`` logits, or ``(E, n, C)`` for ``E`` episodes (pooled).
            labels: ``(n,)`` or ``(E, n)`` integer labels in ``0 … C-1``.

        Returns:
            ``self``, fitted.

        Raises:
            ValueError: on a parameter out of range, or logits/labels of the wrong shape, type or range.
        """
        _check_solver_params(self.t_min, self.t_max, self.tol, self.max_iter)
        z, y = _check_fit_inputs(logits, labels, ndims=(2, 3))
        z, y = z.reshape(1, -1, z.shape[-1]), y.reshape(1, -1)
        t_min, t_max, max_iter = float(self.t_min), float(self.t_max), int(self.max_iter)
        solution = _solve_inverse_temperature(z, y, t_min, t_max, float(self.tol), max_iter)
        _warn_not_converged(solution, max_iter, type(self).__name__)
        self.temperature_ = float(np.clip(1.0 / solution.beta[0], t_min, t_max))
        self.n_iter_ = int(solution.n_iter[0])
        self.converged_ = bool(solution.converged[0])
        self.at_bound_ = bool(solution.at_bound[0])
        z_true = np.take_along_axis(z, y[..., None], axis=-1)[..., 0]
        self.nll_before_ = float(_nll_derivatives(z, z_true, np.ones(1))[0][0])
        self.nll_after_ = float(_nll_derivatives(z, z_true, np.array([1.0 / self.temperature_]))[0][0])
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "temperature_"):
            raise NotFittedError(f"{type(self).__name__} is not fitted; call fit(logits, labels) first")

    def transform(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated logits: ``logits / temperature_``.

        Args:
            logits: ``(n, C)`` or ``(E, n, C)`` logits.

        Returns:
            float64 array of the same shape; its argmax along the last axis is unchanged.
        """
        self._check_fitted()
        return _check_logits(logits, ndims=(2, 3)) / self.temperature_

    def predict_proba(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated probabilities: ``softmax(logits / temperature_)`` over the last axis.

        Args:
            logits: ``(n, C)`` or ``(E, n, C)`` logits.

        Returns:
            float64 probabilities of the same shape, summing to 1 along the last axis.
        """
        return softmax(self.transform(logits))

    def fitted_params(self) -> dict[str, float]:
        """The fitted state as flat numbers, for experiment tracking.

        Returns:
            ``{"temperature", "nll_before", "nll_after", "n_iter"}``.
        """
        self._check_fitted()
        return {
            "temperature": self.temperature_,
            "nll_before": self.nll_before_,
            "nll_after": self.nll_after_,
            "n_iter": float(self.n_iter_),
        }


# --------------------------------------------------------------------------- few-shot settings


def calibrate_with_val_episodes(
    test: EpisodeResults, val: EpisodeResults, *, t_min: float = 0.05, t_max: float = 100.0
) -> EpisodeResults:
    """Temperature scaling for few-shot episodes: one temperature fitted on the method's predictions
    over validation episodes (novel classes of the val split, never the test split), reused on every
    test episode. A 5-shot support set leaves nothing to hold out, so the val episodes stand in.

    Args:
        test: the method's results on the test episodes.
        val: the same method's results on val episodes (same ``n_way``).
        t_min: smallest temperature allowed.
        t_max: largest temperature allowed (squared-distance logits need large ones).

    Returns:
        ``test`` re-scored with ``logits / T``; ``calibrator`` holds ``temperature``, the val NLL before
        and after, the iteration count and ``val_k_shot``.
    """
    scaler = TemperatureScaling(t_min=t_min, t_max=t_max).fit(val.logits, val.labels)
    params = {**scaler.fitted_params(), "val_k_shot": float(val.k_shot), "val_episodes": float(len(val))}
    return test.with_logits(scaler.transform(test.logits), "val_temperature", params)


def calibrate_with_support_leave_one_out(
    test: EpisodeResults, *, t_min: float = 0.05, t_max: float = 100.0
) -> EpisodeResults:
    """A temperature per test episode, fitted on the leave-one-out predictions of its own support set
    (each support sample scored by the method fitted on the others), so no other data is used.

    Args:
        test: results computed with ``leave_one_out=True`` (``support_logits`` present; K ≥ 2).
        t_min: smallest temperature allowed; an episode whose held-out support predictions are all
            right gets it (its NLL keeps falling as ``T → 0``).
        t_max: largest temperature allowed.

    Returns:
        ``test`` re-scored with each episode's ``logits / T_e``; ``calibrator`` holds the median and
        quartiles of ``T_e`` and the fraction of episodes at a bound.
    """
    if test.support_logits is None or test.support_labels is None:
        raise ValueError(f"{test.method}: no leave-one-out support logits; evaluate with leave_one_out=True")
    temperatures = fit_episode_temperatures(
        test.support_logits, test.support_labels, t_min=t_min, t_max=t_max
    )
    at_bound = np.isclose(temperatures, t_min) | np.isclose(temperatures, t_max)
    q25, median, q75 = np.quantile(temperatures, [0.25, 0.5, 0.75])
    params = {
        "temperature_median": float(median),
        "temperature_q25": float(q25),
        "temperature_q75": float(q75),
        "fraction_at_bound": float(at_bound.mean()),
    }
    return test.with_logits(test.logits / temperatures[:, None, None], "loo_temperature", params)


def _with_val_episodes(
    test: EpisodeResults, val: EpisodeResults | None, t_min: float, t_max: float
) -> EpisodeResults | None:
    return None if val is None else calibrate_with_val_episodes(test, val, t_min=t_min, t_max=t_max)


def _with_support_leave_one_out(
    test: EpisodeResults, val: EpisodeResults | None, t_min: float, t_max: float
) -> EpisodeResults | None:
    if test.support_logits is None:
        return None
    return calibrate_with_support_leave_one_out(test, t_min=t_min, t_max=t_max)


#: Few-shot calibration settings by name (``evaluation.calibration``): each takes the test results,
#: the val-episode results (or ``None``) and the temperature bounds, and returns the calibrated test
#: results, or ``None`` where it does not apply (no val results; no leave-one-out logits).
CALIBRATION_SETTINGS: dict[
    str, Callable[[EpisodeResults, EpisodeResults | None, float, float], EpisodeResults | None]
] = {
    "val_temperature": _with_val_episodes,
    "loo_temperature": _with_support_leave_one_out,
}
