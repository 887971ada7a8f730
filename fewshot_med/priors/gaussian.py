"""Gaussian priors on a network's weights, as penalties for MAP fine-tuning.

Both priors are bound to named parameter tensors (like an optimiser) and ``penalty()`` returns their
negative log density at the current values, up to a constant, as a differentiable scalar:

- ``L2SPPrior``: the isotropic Gaussian at the starting weights θ₀ of L2-SP (Li, Grandvalet &
  Davoine, "Explicit Inductive Bias for Transfer Learning with Convolutional Networks", ICML 2018).
- ``SwagPrior``: a SWAG posterior N(θ̄, scale·Σ) of pretraining used as the prior (Shwartz-Ziv et al.,
  "Pre-Train Your Loss: Easy Bayesian Transfer Learning with Informative Priors", NeurIPS 2022).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from fewshot_med.priors.swag import SwagPosterior


class L2SPPrior:
    """``weight/2 · Σ‖θ - θ₀‖²`` over the given parameters, θ₀ their values at construction.

    Args:
        params: ``(name, tensor)`` pairs; the tensors are read at every ``penalty()``.
        weight: the precision of the Gaussian (Li et al.'s alpha), ≥ 0.
    """

    def __init__(self, params: Sequence[tuple[str, Tensor]], weight: float) -> None:
        self.names = tuple(name for name, _ in params)
        self.weight = weight
        self._params = [p for _, p in params]
        self._anchors = [p.detach().clone() for p in self._params]

    def penalty(self) -> Tensor:
        """The scalar ``weight/2 · Σ‖θ - θ₀‖²`` (float32 or the parameters' dtype)."""
        squares = sum((p - a).square().sum() for p, a in zip(self._params, self._anchors, strict=True))
        return 0.5 * self.weight * squares


class SwagPrior:
    """The SWAG Gaussian N(θ̄, scale·Σ), Σ = ½·diag(σ²) + ½·DᵀD/(K - 1), on the parameters it covers.

    Only the given parameters that the posterior covers (same name and shape) get the prior: its
    marginal, i.e. θ̄, σ² and the columns of D at their coordinates. ``penalty()`` is
    ½(θ - θ̄)ᵀ(scale·Σ)⁻¹(θ - θ̄), the negative log density up to a constant. With
    A = ½·scale·diag(σ²) and U = √(scale/(2(K - 1)))·Dᵀ ``(P, K)``, the Woodbury identity gives
    Σ⁻¹ = A⁻¹ - A⁻¹U·C⁻¹·UᵀA⁻¹ with C = I_K + UᵀA⁻¹U, so after one ``O(P·K²)`` set-up (C and its
    Cholesky factor) each evaluation costs ``O(P·K)``. P-long vectors stay in the posterior's dtype;
    the K-dimensional algebra runs in float64 (float32 on MPS, which has no float64).

    Args:
        posterior: the SWAG posterior of pretraining.
        params: ``(name, tensor)`` pairs (e.g. a module's trainable parameters); the tensors are read
            at every ``penalty()``, and the prior's tensors live on their device.
        scale: the covariance's factor (> 0); Shwartz-Ziv et al. search 1e0 … 1e10.

    Attributes:
        names: the covered parameters, in the order of ``params``.

    Raises:
        ValueError: ``scale`` ≤ 0, a covered name with another shape, or no parameter covered.
    """

    def __init__(self, posterior: SwagPosterior, params: Sequence[tuple[str, Tensor]], scale: float) -> None:
        if not scale > 0:
            raise ValueError(f"SwagPrior: scale must be > 0, got {scale}")
        offsets = dict(zip(posterior.names, _offsets(posterior.shapes), strict=True))
        shapes = dict(zip(posterior.names, posterior.shapes, strict=True))
        covered = [(name, p) for name, p in params if name in offsets]
        for name, p in covered:
            if tuple(p.shape) != shapes[name]:
                raise ValueError(
                    f"SwagPrior: parameter {name} has shape {list(p.shape)}, "
                    f"the posterior's {list(shapes[name])}"
                )
        if not covered:
            raise ValueError(
                f"SwagPrior: the posterior covers none of the {len(params)} parameters (it covers "
                f"{len(posterior.names)}, e.g. {', '.join(posterior.names[:3])}); was it collected from this "
                "backbone?"
            )
        self.names = tuple(name for name, _ in covered)
        self._params = [p for _, p in covered]
        device = self._params[0].device
        segments = _merge([(offsets[name], offsets[name] + p.numel()) for name, p in covered])

        def gather(values: Tensor) -> Tensor:
            parts = [values.narrow(-1, start, stop - start) for start, stop in segments]
            return (parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)).to(device)

        self.mean = gather(posterior.mean)
        rank = posterior.rank
        self._inverse_diagonal = 2.0 / (scale * gather(posterior.variance))  # A⁻¹, (P,)
        self._low_rank = math.sqrt(scale / (2 * (rank - 1))) * gather(posterior.deviations)  # Uᵀ, (K, P)
        capacitance = (self._low_rank * self._inverse_diagonal) @ self._low_rank.T  # UᵀA⁻¹U, (K, K)
        self._dtype = torch.float32 if device.type == "mps" else torch.float64
        identity = torch.eye(rank, dtype=self._dtype, device=device)
        self._cholesky = torch.linalg.cholesky(identity + capacitance.to(self._dtype))  # C = LLᵀ

    def quadratic_form(self, delta: Tensor) -> Tensor:
        """δᵀ(scale·Σ)⁻¹δ of a ``(P,)`` vector over the covered coordinates (``names`` order) -> scalar
        of ``delta``'s dtype."""
        scaled = delta * self._inverse_diagonal  # A⁻¹δ
        projected = (self._low_rank @ scaled).to(self._dtype).unsqueeze(-1)  # UᵀA⁻¹δ, (K, 1)
        solved = torch.linalg.solve_triangular(self._cholesky, projected, upper=False)  # L⁻¹UᵀA⁻¹δ
        return ((delta * scaled).sum().to(self._dtype) - solved.square().sum()).to(delta.dtype)

    def penalty(self) -> Tensor:
        """½(θ - θ̄)ᵀ(scale·Σ)⁻¹(θ - θ̄) at the current parameter values (scalar)."""
        theta = torch.cat([p.reshape(-1) for p in self._params])
        return 0.5 * self.quadratic_form(theta - self.mean)


def _offsets(shapes: Sequence[tuple[int, ...]]) -> list[int]:
    """Start of each parameter in the flattened vector."""
    return [0, *itertools.accumulate(math.prod(shape) for shape in shapes)][: len(shapes)]


def _merge(segments: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """``[start, stop)`` ranges with adjacent ones joined (a contiguous block is one view, no copy)."""
    merged: list[tuple[int, int]] = []
    for start, stop in segments:
        if merged and merged[-1][1] == start:
            merged[-1] = (merged[-1][0], stop)
        else:
            merged.append((start, stop))
    return merged
