"""BD-CSPN: prototypes rectified with the episode's pseudo-labelled queries (transductive)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fewshot_med.methods.base import (
    TransductiveMethod,
    class_means,
    register_method,
    require_positive,
)


def cosine_logits(features: Tensor, prototypes: Tensor, scale: float) -> Tensor:
    """``scale · cos(feature, prototype)``: ``(E, n, D)`` and ``(E, m, D)`` -> ``(E, n, m)``."""
    return scale * F.normalize(features, dim=-1) @ F.normalize(prototypes, dim=-1).transpose(1, 2)


@register_method("bd_cspn")
class BDCSPN(TransductiveMethod):
    """Nearest prototype after bias diminishing, the prototype rectification of BD-CSPN.

    Liu, Song & Qin, "Prototype Rectification for Few-Shot Learning", ECCV 2020. Two biases of the
    support-mean prototypes are reduced with the episode's unlabelled queries:

    - *cross-class bias*: the queries are shifted by ``mean(support) - mean(queries)``;
    - *intra-class bias*: each prototype becomes a weighted mean of its class's support features and
      of the queries pseudo-labelled as that class (the argmax of their cosine logits), with weights
      ``exp(scale · cos(x, P_c))`` normalised per class.

    A query's logits are ``scale · cos(query, rectified prototype)``. Batched over episodes: every
    step is a few tensor operations on ``(E, n, D)``.

    Shapes: support ``(E, n_support, D)``, query ``(E, n_query, D)``, logits ``(E, n_query, n_way)``
    (``E`` episodes; one episode may drop the axis).

    Args:
        features: the ``FEATURE_TRANSFORMS`` entry applied first (``centred`` needs the base mean).
        scale: the cosine temperature ε of the paper's weights, and the logits' scale.
        base_feature_mean: ``(D,)`` mean base-class train feature (from the ``MethodContext``).

    Attributes:
        support_, labels_: the transformed support set and its labels (``TransductiveMethod``).
        prototypes_: ``(E, n_way, D)`` the rectified prototypes of the last ``predict_logits`` call.
    """

    def __init__(
        self, features: str = "l2", scale: float = 10.0, base_feature_mean: Tensor | None = None
    ) -> None:
        self.features = features
        self.scale = scale
        self.base_feature_mean = base_feature_mean

    def check_params(self) -> None:
        super().check_params()
        require_positive("scale", self.scale)

    def _predict_logits(self, query: Tensor) -> Tensor:
        support = self.support_
        query = self._transform_queries(query)
        query = query + (support.mean(dim=1, keepdim=True) - query.mean(dim=1, keepdim=True))
        prototypes = class_means(support, self.labels_, self.n_way_)
        support_weights = cosine_logits(support, prototypes, self.scale)
        query_weights = cosine_logits(query, prototypes, self.scale)
        support_onehot = F.one_hot(self.labels_, self.n_way_).to(support.dtype)
        query_onehot = F.one_hot(query_weights.argmax(dim=-1), self.n_way_).to(support.dtype)
        # exp(ε cos) weights within each class, stabilised by the largest logit of the episode
        shift = torch.maximum(support_weights.amax(dim=(1, 2)), query_weights.amax(dim=(1, 2)))[:, None, None]
        support_weights = (support_weights - shift).exp() * support_onehot
        query_weights = (query_weights - shift).exp() * query_onehot
        totals = support_weights.sum(dim=1) + query_weights.sum(dim=1)  # (E, n_way), > 0: supports present
        self.prototypes_ = (
            support_weights.transpose(1, 2) @ support + query_weights.transpose(1, 2) @ query
        ) / totals.unsqueeze(-1)
        return cosine_logits(query, self.prototypes_, self.scale)
