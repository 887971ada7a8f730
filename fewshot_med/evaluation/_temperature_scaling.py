"""``TemperatureScaling``, the scikit-learn estimator of ``fewshot_med.evaluation.calibration``.

It lives apart because subclassing ``sklearn.base.BaseEstimator`` imports scikit-learn (with SciPy and
pandas, seconds on a small machine); ``calibration`` imports this module on first use of the name, so
validating a config against the calibration registry stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from sklearn.base import BaseEstimator

from fewshot_med.evaluation._temperature import (
    _check_fit_inputs,
    _check_logits,
    _check_solver_params,
    _nll_derivatives,
    _solve_inverse_temperature,
    _warn_not_converged,
)
from fewshot_med.evaluation.metrics import softmax
from fewshot_med.methods.base import NotFittedError

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["TemperatureScaling"]


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
