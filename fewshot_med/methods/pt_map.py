"""PT-MAP: power-transformed features, class centres fitted by optimal transport (transductive)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fewshot_med.methods.base import (
    TransductiveMethod,
    class_means,
    euclidean_distances,
    register_method,
    require_positive,
)


def sinkhorn(scores: Tensor, column_mass: Tensor, iterations: int) -> Tensor:
    """The transport plan with rows summing to 1 and columns to ``column_mass``, and its log.

    Sinkhorn-Knopp scaling (Cuturi, NeurIPS 2013) of the kernel ``exp(scores)``: ``(E, n, m)`` scores
    and ``(E, m)`` column masses (summing to ``n``) -> ``(E, n, m)`` plan, ending on a row step (each
    row is a distribution over the ``m`` classes). Each row's largest score is subtracted before the
    exponential, so every row keeps an entry of 1 and the kernel never overflows; sums are floored
    at ``1e-30`` so a column the kernel underflows to zero cannot divide by zero.
    """
    plan = (scores - scores.amax(dim=2, keepdim=True)).exp()
    for _ in range(iterations):
        plan = plan * (column_mass.unsqueeze(1) / plan.sum(dim=1, keepdim=True).clamp_min(1e-30))
        plan = plan / plan.sum(dim=2, keepdim=True).clamp_min(1e-30)
    return plan


#: Floor of the plan's entries before the log: finite logits (and NLL) for assignments that underflow.
MIN_PROBABILITY = 1e-12


@register_method("pt_map")
class PTMAP(TransductiveMethod):
    """PT-MAP: maximum-a-posteriori class centres under balanced optimal transport of the queries.

    Hu, Gripon & Pateux, "Leveraging the Feature Distribution in Transfer-based Few-Shot Learning",
    ICANN 2021. Features are power-transformed and L2-normalised (``features='power'``), then centred
    on the episode's mean and normalised again. Class centres start at the support means; each of
    ``steps`` iterations assigns the queries to classes by a Sinkhorn transport plan of the kernel
    ``exp(-lam · ||z - μ_c||²)`` with every class receiving ``n_query / n_way`` of the mass (the
    method's balanced-classes assumption), adds the support's one-hot labels, and moves each centre a
    fraction ``alpha`` towards the weighted mean. The logits are the log of the final plan's rows,
    i.e. the query's soft assignment, floored at ``MIN_PROBABILITY`` so they stay finite.

    Shapes: support ``(E, n_support, D)``, query ``(E, n_query, D)``, logits ``(E, n_query, n_way)``
    (``E`` episodes; one episode may drop the axis).

    Args:
        features: the ``FEATURE_TRANSFORMS`` entry applied first (``power`` in the paper).
        lam: the kernel's inverse temperature λ (paper: 10).
        alpha: the centres' step size (paper: 0.2).
        steps: centre updates (paper: 20 to 30).
        sinkhorn_iterations: scaling iterations per assignment.
        base_feature_mean: ``(D,)`` mean base-class train feature (from the ``MethodContext``).

    Attributes:
        support_, labels_: the transformed support set and its labels (``TransductiveMethod``).
        centres_: ``(E, n_way, D)`` the class centres of the last ``predict_logits`` call.
    """

    def __init__(
        self,
        features: str = "power",
        lam: float = 10.0,
        alpha: float = 0.2,
        steps: int = 30,
        sinkhorn_iterations: int = 50,
        base_feature_mean: Tensor | None = None,
    ) -> None:
        self.features = features
        self.lam = lam
        self.alpha = alpha
        self.steps = steps
        self.sinkhorn_iterations = sinkhorn_iterations
        self.base_feature_mean = base_feature_mean

    def check_params(self) -> None:
        super().check_params()
        require_positive("lam", self.lam)
        require_positive("alpha", self.alpha)
        if self.alpha > 1:
            raise ValueError(f"alpha must be at most 1 (a step towards the new centres), got {self.alpha!r}")
        require_positive("steps", self.steps, integer=True)
        require_positive("sinkhorn_iterations", self.sinkhorn_iterations, integer=True)

    def _predict_logits(self, query: Tensor) -> Tensor:
        query = self._transform_queries(query)
        n_support = self.support_.shape[1]
        episode = torch.cat([self.support_, query], dim=1)
        episode = F.normalize(episode - episode.mean(dim=1, keepdim=True), dim=-1)
        support, query = episode[:, :n_support], episode[:, n_support:]
        support_onehot = F.one_hot(self.labels_, self.n_way_).to(episode.dtype)
        column_mass = torch.full(
            (len(query), self.n_way_),
            query.shape[1] / self.n_way_,
            dtype=episode.dtype,
            device=episode.device,
        )
        centres = class_means(support, self.labels_, self.n_way_)
        for _ in range(self.steps):
            plan = self._plan(query, centres, column_mass)
            weights = torch.cat([support_onehot, plan], dim=1)  # (E, n_support + n_query, n_way)
            targets = (weights.transpose(1, 2) @ episode) / weights.sum(dim=1).unsqueeze(-1)
            centres = centres + self.alpha * (targets - centres)
        self.centres_ = centres
        return self._plan(query, centres, column_mass).clamp_min(MIN_PROBABILITY).log()

    def _plan(self, query: Tensor, centres: Tensor, column_mass: Tensor) -> Tensor:
        scores = -self.lam * euclidean_distances(query, centres, squared=True)
        return sinkhorn(scores, column_mass, self.sinkhorn_iterations)
