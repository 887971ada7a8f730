"""Prototypical Networks inference on frozen features."""

from __future__ import annotations

from torch import Tensor

from fewshot_med.methods.base import FewShotMethod, class_means, euclidean_distances, register_method


@register_method("protonet")
class ProtoNet(FewShotMethod):
    """Nearest class mean under squared Euclidean distance.

    Snell, Swersky & Zemel, "Prototypical Networks for Few-shot Learning", NeurIPS 2017. A class's
    prototype is the mean of its support features; a query's logits are its negative squared
    Euclidean distances to the prototypes (the distance ProtoNet meta-trains with).

    Shapes: support ``(E, n_support, D)``, query ``(E, n_query, D)``, logits ``(E, n_query, n_way)``
    (``E`` episodes; one episode may drop the axis).

    Attributes:
        prototypes_: ``(E, n_way, D)`` class means of the support features.
    """

    inputs = "features"

    def _fit(self, support: Tensor, labels: Tensor) -> None:
        self.prototypes_ = class_means(support.float(), labels, self.n_way_)

    def _predict_logits(self, query: Tensor) -> Tensor:
        return -euclidean_distances(query.float().to(self.prototypes_.device), self.prototypes_, squared=True)
