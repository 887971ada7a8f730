"""Feature transforms applied to frozen embeddings before a few-shot head, by name.

Every frozen-feature method that takes a ``features`` parameter, the Laplace head's candidates and the
selection study read this one registry, so a name means the same transform everywhere.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

#: Exponent of the power transform (Hu, Gripon & Pateux, ICANN 2021 use β = 0.5).
POWER_BETA = 0.5
#: Added to ``|x|`` before the power, so the transform is finite and has a finite gradient at 0.
POWER_EPSILON = 1e-6


def _required(base_mean: Tensor | None) -> Tensor:
    if base_mean is None:
        raise ValueError("features 'centred' needs the base-class mean feature, which this run does not have")
    return base_mean


def power_transform(features: Tensor, beta: float = POWER_BETA) -> Tensor:
    """PT-MAP's power transform, made sign-safe: ``sign(x) · (|x| + ε)^β``, then L2-normalised.

    Hu, Gripon & Pateux, "Leveraging the Feature Distribution in Transfer-based Few-Shot Learning",
    ICANN 2021: ``(x + ε)^β`` brings ReLU features closer to Gaussian. Applying it to ``|x|`` and
    restoring the sign keeps it finite on features with negative entries (centred features, or
    backbones without a final ReLU), where ``x^β`` would be NaN. ``(..., D) -> (..., D)``.
    """
    powered = torch.sign(features) * (features.abs() + POWER_EPSILON).pow(beta)
    return F.normalize(powered, dim=-1)


#: Feature transforms by name: ``(features (..., D), base_feature_mean (D,) or None) -> (..., D)``.
FEATURE_TRANSFORMS: dict[str, Callable[[Tensor, Tensor | None], Tensor]] = {
    "raw": lambda features, base_mean: features,
    "l2": lambda features, base_mean: F.normalize(features, dim=-1),
    # SimpleShot's CL2N (Wang, Chao, Weinberger & van der Maaten, arXiv:1911.04623, 2019)
    "centred": lambda features, base_mean: F.normalize(features - _required(base_mean), dim=-1),
    "power": lambda features, base_mean: power_transform(features),
}


def transform_features(name: str, features: Tensor, base_mean: Tensor | None = None) -> Tensor:
    """``(..., D)`` float32 features under the transform ``name`` (``base_mean`` ``(D,)`` is moved to
    the features' device)."""
    features = features.float()
    if base_mean is not None:
        base_mean = base_mean.to(device=features.device, dtype=features.dtype)
    return FEATURE_TRANSFORMS[name](features, base_mean)


def needs_base_mean(name: str) -> bool:
    """Whether the transform ``name`` centres on the base-class mean feature."""
    return name == "centred"
