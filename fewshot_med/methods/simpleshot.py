"""SimpleShot: nearest centroid on centred, L2-normalised frozen features."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fewshot_med.methods.base import (
    FewShotMethod,
    class_means,
    euclidean_distances,
    register_method,
    require_positive,
)


@register_method("simpleshot")
class SimpleShot(FewShotMethod):
    """Nearest centroid after CL2N feature transformation.

    Wang, Chao, Weinberger & van der Maaten, "SimpleShot: Revisiting Nearest-Neighbor Classification
    for Few-Shot Learning", arXiv:1911.04623, 2019. CL2N: subtract the mean feature of the base-class
    training images, then L2-normalise. A class's centroid is the mean of its transformed support
    features; a query goes to the centroid at the smallest Euclidean distance.

    For probabilities, the logits are ``-distance / temperature``. Distances between unit vectors lie
    in ``[0, 2]``, so ``temperature = 1`` gives nearly uniform probabilities; the default 0.1 is the
    usual cosine-classifier scale of 10. The temperature never changes the predicted class.

    Shapes: support ``(E, n_support, D)``, query ``(E, n_query, D)``, ``base_feature_mean`` ``(D,)``,
    logits ``(E, n_query, n_way)`` (``E`` episodes; one episode may drop the axis).

    Args:
        base_feature_mean: ``(D,)`` mean base-class train feature (from the ``MethodContext``).
        temperature: divides the negative distances.

    Attributes:
        centroids_: ``(E, n_way, D)`` class means of the CL2N support features.
    """

    inputs = "features"
    context_params = ("base_feature_mean",)

    def __init__(self, base_feature_mean: Tensor, temperature: float = 0.1) -> None:
        self.base_feature_mean = base_feature_mean
        self.temperature = temperature

    def check_params(self) -> None:
        require_positive("temperature", self.temperature)

    def _transform(self, features: Tensor) -> Tensor:
        mean = self.base_feature_mean.to(device=features.device, dtype=torch.float32)
        return F.normalize(features.float() - mean, dim=-1)

    def _fit(self, support: Tensor, labels: Tensor) -> None:
        if tuple(self.base_feature_mean.shape) != self.input_shape_:
            raise ValueError(
                f"simpleshot: base_feature_mean has shape {tuple(self.base_feature_mean.shape)}, "
                f"the support features {self.input_shape_}"
            )
        self.centroids_ = class_means(self._transform(support), labels, self.n_way_)

    def _predict_logits(self, query: Tensor) -> Tensor:
        return (
            -euclidean_distances(self._transform(query.to(self.centroids_.device)), self.centroids_)
            / self.temperature
        )
