"""TIM and alpha-TIM: a classifier fitted by maximising the mutual information with the queries
(transductive)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fewshot_med.methods.base import (
    TransductiveMethod,
    class_means,
    euclidean_distances,
    register_method,
    require_non_negative,
    require_positive,
)


def alpha_entropy(probs: Tensor, alpha: float) -> Tensor:
    """Tsallis alpha-entropy of ``(..., n_way)`` distributions -> ``(...)``; Shannon's at ``alpha = 1``.

    ``H_alpha(p) = (1 - Σ_k p_k^alpha) / (alpha - 1)``, which tends to ``-Σ_k p_k log p_k`` as ``alpha -> 1``.
    """
    if alpha == 1.0:
        return -(probs * probs.clamp_min(1e-12).log()).sum(dim=-1)
    return (1.0 - probs.clamp_min(0).pow(alpha).sum(dim=-1)) / (alpha - 1.0)


@register_method("tim")
class TIM(TransductiveMethod):
    """Transductive Information Maximization, by gradient descent (TIM-GD), with alpha-entropies as an option.

    Boudiaf, Masud, Rony, Dolz, Piantanida & Ben Ayed, "Information Maximization for Few-Shot
    Learning", NeurIPS 2020. The classifier's weights start at the support prototypes and descend, with
    Adam, on ``ce_weight · CE(support) - marginal_weight · H(Ŷ_Q) + conditional_weight · H(Ŷ_Q | X_Q)``:
    fit the labelled support, keep the query predictions confident (low conditional entropy) and the
    predicted class marginal spread out (high marginal entropy). Logits are
    ``-temperature / 2 · ||z - w_c||²`` on the transformed features ``z``, as in the paper.

    ``alpha ≠ 1`` gives alpha-TIM (Veilleux, Boudiaf, Piantanida & Ben Ayed, "Realistic Evaluation of
    Transductive Few-Shot Learning", NeurIPS 2021): Tsallis alpha-entropies replace Shannon's, which
    makes the marginal term tolerate class-imbalanced query sets.

    All episodes descend together (one Adam state over ``(E, n_way, D)`` weights; the loss is the
    sum of the episodes' losses, so each episode's gradient is its own).

    Shapes: support ``(E, n_support, D)``, query ``(E, n_query, D)``, logits ``(E, n_query, n_way)``
    (``E`` episodes; one episode may drop the axis).

    Args:
        features: the ``FEATURE_TRANSFORMS`` entry applied first (``centred`` needs the base mean).
        temperature: the logits' scale τ (the paper's 15).
        steps: Adam steps (the paper's TIM-GD: 1000 at lr 1e-4; fewer larger steps are equivalent here).
        lr: Adam's learning rate.
        ce_weight: weight of the support cross-entropy (paper: 0.1).
        marginal_weight: weight of the marginal entropy (paper: 1).
        conditional_weight: weight of the conditional entropy (paper: 0.1).
        alpha: the entropies' alpha (1: TIM; alpha-TIM tunes it on val episodes).
        base_feature_mean: ``(D,)`` mean base-class train feature (from the ``MethodContext``).

    Attributes:
        support_, labels_: the transformed support set and its labels (``TransductiveMethod``).
        weights_: ``(E, n_way, D)`` the weights fitted by the last ``predict_logits`` call.
    """

    def __init__(
        self,
        features: str = "l2",
        temperature: float = 15.0,
        steps: int = 100,
        lr: float = 1e-3,
        ce_weight: float = 0.1,
        marginal_weight: float = 1.0,
        conditional_weight: float = 0.1,
        alpha: float = 1.0,
        base_feature_mean: Tensor | None = None,
    ) -> None:
        self.features = features
        self.temperature = temperature
        self.steps = steps
        self.lr = lr
        self.ce_weight = ce_weight
        self.marginal_weight = marginal_weight
        self.conditional_weight = conditional_weight
        self.alpha = alpha
        self.base_feature_mean = base_feature_mean

    def check_params(self) -> None:
        super().check_params()
        require_positive("temperature", self.temperature)
        require_positive("steps", self.steps, integer=True)
        require_positive("lr", self.lr)
        for name in ("ce_weight", "marginal_weight", "conditional_weight"):
            require_non_negative(name, getattr(self, name))
        require_positive("alpha", self.alpha)

    def _logits(self, features: Tensor, weights: Tensor) -> Tensor:
        return -0.5 * self.temperature * euclidean_distances(features, weights, squared=True)

    def _predict_logits(self, query: Tensor) -> Tensor:
        # plain tensors (embeddings may be inference tensors) and autograd on, even under inference_mode
        with torch.inference_mode(False), torch.enable_grad():
            support = self.support_.clone()
            query = self._transform_queries(query).clone()
            weights = class_means(support, self.labels_, self.n_way_).requires_grad_(True)
            optimizer = torch.optim.Adam([weights], lr=self.lr)
            for _ in range(self.steps):
                support_logits = self._logits(support, weights)
                cross_entropy = F.cross_entropy(
                    support_logits.flatten(0, 1), self.labels_.flatten(), reduction="none"
                ).view(self.labels_.shape)
                probs = self._logits(query, weights).softmax(dim=-1)  # (E, n_query, n_way)
                marginal = alpha_entropy(probs.mean(dim=1), self.alpha)
                conditional = alpha_entropy(probs, self.alpha).mean(dim=1)
                loss = (
                    self.ce_weight * cross_entropy.mean(dim=1)
                    - self.marginal_weight * marginal
                    + self.conditional_weight * conditional
                ).sum()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        self.weights_ = weights.detach()
        return self._logits(query, self.weights_)
