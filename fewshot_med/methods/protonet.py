"""Prototypical Networks inference on frozen features."""

from __future__ import annotations

from torch import Tensor

from fewshot_med.methods.base import FewShotMethod, class_means, euclidean_distances, register_method


def prototype_logits(query: Tensor, prototypes: Tensor) -> Tensor:
    """Prototypical-network logits (Snell et al., 2017): minus squared Euclidean distances.

    Differentiable in both arguments, so meta-training backpropagates the episode loss through it.

    Args:
        query: ``(E, n_query, D)`` features (``(1, n_query, D)`` is shared by all episodes).
        prototypes: ``(E, n_way, D)`` class means of the support features (``class_means``).

    Returns:
        ``(E, n_query, n_way)`` logits ``-||query - prototype||²``.
    """
    return -euclidean_distances(query, prototypes, squared=True)


@register_method("protonet")
class ProtoNet(FewShotMethod):
    """Nearest class mean under squared Euclidean distance.

    Snell, Swersky & Zemel, "Prototypical Networks for Few-shot Learning", NeurIPS 2017. A class's
    prototype is the mean of its support features; a query's logits are its negative squared
    Euclidean distances to the prototypes (the distance ProtoNet meta-trains with: see
    ``prototype_logits``, which meta-training calls too).

    Shapes: support ``(E, n_support, D)``, query ``(E, n_query, D)``, logits ``(E, n_query, n_way)``
    (``E`` episodes; one episode may drop the axis).

    Attributes:
        prototypes_: ``(E, n_way, D)`` class means of the support features.
    """

    inputs = "features"

    def _fit(self, support: Tensor, labels: Tensor) -> None:
        self.prototypes_ = class_means(support.float(), labels, self.n_way_)

    def _predict_logits(self, query: Tensor) -> Tensor:
        return prototype_logits(query.float().to(self.prototypes_.device), self.prototypes_)
