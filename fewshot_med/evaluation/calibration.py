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

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from fewshot_med.evaluation._temperature import (
    _check_fit_inputs,
    _check_solver_params,
    _solve_inverse_temperature,
    _warn_not_converged,
)

if TYPE_CHECKING:
    from fewshot_med.evaluation._temperature_scaling import TemperatureScaling
    from fewshot_med.evaluation.runner import EpisodeResults

__all__ = [
    "CALIBRATION_SETTINGS",
    "TemperatureScaling",
    "calibrate_with_support_leave_one_out",
    "calibrate_with_val_episodes",
    "fit_episode_temperatures",
]


def __getattr__(name: str) -> Any:
    """``TemperatureScaling`` on first use: its module imports scikit-learn, which takes seconds, and
    validating a config against ``CALIBRATION_SETTINGS`` needs only this module."""
    if name == "TemperatureScaling":
        from fewshot_med.evaluation._temperature_scaling import TemperatureScaling

        return TemperatureScaling
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    from fewshot_med.evaluation._temperature_scaling import TemperatureScaling

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
