"""SWAG: a Gaussian posterior over a network's weights from the SGD iterates of its last epochs.

Maddox, Izmailov, Garipov, Vetrov & Wilson, "A Simple Baseline for Bayesian Uncertainty in Deep
Learning", NeurIPS 2019. Snapshots θ_1 … θ_T of the weights give the running mean θ̄, a diagonal
variance σ² = mean(θ²) - θ̄² and the last K deviations D_i = θ_i - θ̄_i (θ̄_i: the mean after i
snapshots); the posterior is N(θ̄, ½·diag(σ²) + ½·DᵀD/(K - 1)) with D stacked ``(K, P)``. Shwartz-Ziv
et al., "Pre-Train Your Loss: Easy Bayesian Transfer Learning with Informative Priors", NeurIPS 2022,
rescale its covariance and use it as the prior of downstream fine-tuning.

The weights are the module's floating-point parameters that require gradients, flattened in
``named_parameters()`` order (logical element order, whatever the memory format). Batch-norm running
statistics are buffers, not parameters, so they are not covered: recompute them for a sampled weight
vector (as Maddox et al. do) or keep the backbone's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

#: Smallest diagonal variance, as in the reference implementation of Maddox et al.
VARIANCE_FLOOR = 1e-30


@dataclass(frozen=True)
class SwagPosterior:
    """A SWAG posterior over ``P`` flattened weights.

    Attributes:
        mean: ``(P,)`` float32, θ̄, the average of the snapshots (SWA weights).
        variance: ``(P,)`` float32, σ² = mean(θ²) - θ̄² over the snapshots, at least ``VARIANCE_FLOOR``.
        deviations: ``(K, P)`` float32, D, the last ``K`` deviations θ_i - θ̄_i, oldest first (``K ≥ 2``).
        n_snapshots: ``T``, snapshots averaged (``T ≥ K``).
        names: the parameters covered, in ``named_parameters()`` order.
        shapes: their shapes; ``P`` is the sum of their sizes.
    """

    mean: torch.Tensor
    variance: torch.Tensor
    deviations: torch.Tensor
    n_snapshots: int
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        size = sum(math.prod(shape) for shape in self.shapes)
        if len(self.names) != len(self.shapes):
            raise ValueError(f"SwagPosterior: {len(self.names)} names for {len(self.shapes)} shapes")
        if self.mean.shape != (size,) or self.variance.shape != (size,):
            raise ValueError(
                f"SwagPosterior: mean {tuple(self.mean.shape)} and variance {tuple(self.variance.shape)} "
                f"must have shape ({size},), the size of the parameters"
            )
        if self.deviations.ndim != 2 or self.deviations.shape[1] != size or self.deviations.shape[0] < 2:
            raise ValueError(
                f"SwagPosterior: deviations {tuple(self.deviations.shape)} must have shape (K, {size}), K ≥ 2"
            )
        if self.n_snapshots < self.rank:
            raise ValueError(
                f"SwagPosterior: {self.n_snapshots} snapshots cannot give {self.rank} deviations"
            )

    @property
    def rank(self) -> int:
        """``K``, the deviations kept: the rank of the low-rank part of the covariance."""
        return int(self.deviations.shape[0])

    def sample(self, scale: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw θ̄ + √scale·(sqrt(σ²) ⊙ z₁/√2 + Dᵀz₂/√(2(K - 1))), z₁ ~ N(0, I_P), z₂ ~ N(0, I_K).

        Args:
            scale: multiplies the covariance (Shwartz-Ziv et al. rescale the prior this way); 0 gives θ̄.
            generator: CPU source of z₁ and z₂; torch's global one if ``None``.

        Returns:
            ``(P,)`` float32 weights; ``unflatten`` maps them to named parameter tensors.
        """
        if scale < 0:
            raise ValueError(f"SwagPosterior.sample: scale must be ≥ 0, got {scale}")
        diagonal = torch.randn(self.mean.shape, generator=generator) * self.variance.sqrt() / math.sqrt(2)
        low_rank = torch.randn(self.rank, generator=generator) @ self.deviations
        low_rank = low_rank / math.sqrt(2 * (self.rank - 1))
        return self.mean + math.sqrt(scale) * (diagonal + low_rank)

    def unflatten(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        """``(P,)`` weights (e.g. ``mean`` or a sample) as ``{name: tensor of its shape}``, for
        ``module.load_state_dict(…, strict=False)``."""
        if theta.shape != self.mean.shape:
            raise ValueError(
                f"SwagPosterior.unflatten: expected shape {tuple(self.mean.shape)}, got {tuple(theta.shape)}"
            )
        sizes = [math.prod(shape) for shape in self.shapes]
        return {
            name: part.reshape(shape)
            for name, shape, part in zip(self.names, self.shapes, theta.split(sizes), strict=True)
        }

    def state_dict(self) -> dict[str, Any]:
        """Tensors, ints and lists only, so ``torch.load(…, weights_only=True)`` reads it back."""
        return {
            "mean": self.mean,
            "variance": self.variance,
            "deviations": self.deviations,
            "n_snapshots": self.n_snapshots,
            "names": list(self.names),
            "shapes": [list(shape) for shape in self.shapes],
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> SwagPosterior:
        """Inverse of ``state_dict``."""
        return cls(
            mean=state["mean"],
            variance=state["variance"],
            deviations=state["deviations"],
            n_snapshots=int(state["n_snapshots"]),
            names=tuple(state["names"]),
            shapes=tuple(tuple(int(n) for n in shape) for shape in state["shapes"]),
        )


class SwagCollector:
    """Running SWAG moments of a module's weights (Maddox et al., 2019, Algorithm 1).

    Each ``collect`` adds a snapshot: θ̄ ← (nθ̄ + θ)/(n + 1), likewise mean(θ²), then appends θ - θ̄
    and keeps the last ``rank``. The moments are accumulated in float64 on the CPU, so that
    mean(θ²) - θ̄² does not cancel catastrophically; deviations are float32. Memory: 16·P bytes plus
    4·P per deviation kept.

    Args:
        rank: deviations kept (``K``), at least 2.
    """

    def __init__(self, rank: int) -> None:
        if rank < 2:
            raise ValueError(
                f"SwagCollector: rank must be at least 2 (the covariance divides by K - 1), got {rank}"
            )
        self.rank = rank
        self.n_snapshots = 0
        self._names: tuple[str, ...] = ()
        self._shapes: tuple[tuple[int, ...], ...] = ()
        self._mean = torch.zeros(0, dtype=torch.float64)
        self._sq_mean = torch.zeros(0, dtype=torch.float64)
        self._deviations: list[torch.Tensor] = []

    @torch.no_grad()
    def collect(self, module: nn.Module) -> None:
        """Add the current weights of ``module`` as a snapshot.

        Raises:
            ValueError: the module has no trainable floating-point parameters, or their names or
                shapes differ from those of the first snapshot.
        """
        params = [
            (name, p) for name, p in module.named_parameters() if p.requires_grad and p.is_floating_point()
        ]
        if not params:
            raise ValueError("SwagCollector.collect: the module has no trainable floating-point parameters")
        names = tuple(name for name, _ in params)
        shapes = tuple(tuple(p.shape) for _, p in params)
        if self.n_snapshots == 0:
            self._names, self._shapes = names, shapes
        elif (names, shapes) != (self._names, self._shapes):
            raise ValueError(
                f"SwagCollector.collect: the parameters changed since the first snapshot "
                f"({_first_difference(self._names, self._shapes, names, shapes)}); collect from one module"
            )
        theta = torch.cat([p.detach().reshape(-1).to("cpu", torch.float64) for _, p in params])
        n = self.n_snapshots
        if n == 0:
            self._mean, self._sq_mean = theta.clone(), theta.square()
        else:
            self._mean = (n * self._mean + theta) / (n + 1)
            self._sq_mean = (n * self._sq_mean + theta.square()) / (n + 1)
        self.n_snapshots = n + 1
        self._deviations.append((theta - self._mean).float())
        del self._deviations[: -self.rank]

    def posterior(self) -> SwagPosterior:
        """The posterior of the snapshots so far (copies; later snapshots do not change it).

        Raises:
            ValueError: fewer than 2 snapshots.
        """
        if self.n_snapshots < 2:
            raise ValueError(
                f"SwagCollector.posterior: SWAG needs at least 2 snapshots, {self.n_snapshots} collected"
            )
        variance = (self._sq_mean - self._mean.square()).clamp_min(VARIANCE_FLOOR)
        return SwagPosterior(
            mean=self._mean.float(),
            variance=variance.float(),
            deviations=torch.stack(self._deviations),
            n_snapshots=self.n_snapshots,
            names=self._names,
            shapes=self._shapes,
        )

    def state_dict(self) -> dict[str, Any]:
        """Everything ``load_state_dict`` needs to continue bit for bit (tensors, ints, lists). The
        tensors are shared, not copied: the collector replaces its tensors and never writes into them."""
        return {
            "rank": self.rank,
            "n_snapshots": self.n_snapshots,
            "names": list(self._names),
            "shapes": [list(shape) for shape in self._shapes],
            "mean": self._mean,
            "sq_mean": self._sq_mean,
            "deviations": list(self._deviations),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state_dict()`` of a collector with the same rank."""
        if state["rank"] != self.rank:
            raise ValueError(
                f"SwagCollector.load_state_dict: saved rank {state['rank']}, this collector has {self.rank}"
            )
        self.n_snapshots = int(state["n_snapshots"])
        self._names = tuple(state["names"])
        self._shapes = tuple(tuple(int(n) for n in shape) for shape in state["shapes"])
        self._mean, self._sq_mean = state["mean"], state["sq_mean"]
        self._deviations = list(state["deviations"])


def _first_difference(
    names: tuple[str, ...],
    shapes: tuple[tuple[int, ...], ...],
    other_names: tuple[str, ...],
    other_shapes: tuple[tuple[int, ...], ...],
) -> str:
    """The first parameter whose name or shape differs, for an error message."""
    pairs = zip(zip(names, shapes, strict=True), zip(other_names, other_shapes, strict=True), strict=False)
    for index, (first, second) in enumerate(pairs):
        if first != second:
            return f"parameter {index}: {first[0]} {list(first[1])} then {second[0]} {list(second[1])}"
    return f"{len(names)} parameters then {len(other_names)}"
