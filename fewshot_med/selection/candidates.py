"""Candidate configurations of the Bayesian linear head: a feature transform and a prior precision."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

from fewshot_med.models.feature_transforms import FEATURE_TRANSFORMS


@dataclass(frozen=True)
class Candidate:
    """One configuration: ``features`` names a ``FEATURE_TRANSFORMS`` entry, ``prior_precision`` is the
    precision ``λ`` of the Gaussian prior on the weights (the weight decay of the MAP fit)."""

    features: str
    prior_precision: float

    def __post_init__(self) -> None:
        if self.features not in FEATURE_TRANSFORMS:
            raise ValueError(
                f"features must be one of {', '.join(FEATURE_TRANSFORMS)}, got {self.features!r}"
            )
        if not self.prior_precision > 0:
            raise ValueError(f"prior_precision must be > 0, got {self.prior_precision}")

    @property
    def label(self) -> str:
        """E.g. ``l2, λ=0.1``."""
        return f"{self.features}, λ={self.prior_precision:g}"

    def transform(self, features: Tensor, base_feature_mean: Tensor | None = None) -> Tensor:
        """``(..., D)`` features as this candidate sees them."""
        return FEATURE_TRANSFORMS[self.features](features, base_feature_mean)


def candidate_grid(features: Sequence[str], prior_precisions: Sequence[float]) -> list[Candidate]:
    """Every combination, features-major: ``[(f0, λ0), (f0, λ1), …, (f1, λ0), …]``."""
    return [
        Candidate(name, float(precision)) for name, precision in itertools.product(features, prior_precisions)
    ]
