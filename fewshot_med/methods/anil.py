"""ANIL test-time adaptation: a linear head trained by a few gradient steps on frozen features."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fewshot_med.methods.base import FewShotMethod, episode_matmul, register_method, require_positive


def fit_linear_head(
    support: Tensor, labels: Tensor, n_way: int, steps: int, lr: float
) -> tuple[Tensor, Tensor]:
    """ANIL's inner loop (Raghu et al., 2020): gradient descent on a zero-initialised linear head.

    Full-batch steps on the mean cross-entropy, with the gradient written out
    (``∂/∂logits = (softmax - one_hot) / n_support``), so the loop also runs inside
    ``torch.inference_mode``. The updates are out of place, so the head stays a differentiable function
    of ``support``: a loss on the adapted head backpropagates through every step (second order in the
    head) into the features, which is how ANIL meta-training reaches the backbone.

    Args:
        support: ``(E, n_support, D)`` features (``E`` episodes, each with its own head).
        labels: ``(E, n_support)`` int64 in ``0 … n_way - 1``.
        n_way: number of classes.
        steps: gradient steps.
        lr: step size.

    Returns:
        ``(weight, bias)`` of shapes ``(E, n_way, D)`` and ``(E, n_way)``, in ``support``'s dtype;
        ``head_logits`` applies them.
    """
    targets = F.one_hot(labels, n_way).to(support.dtype)
    n_episodes, n_support, dim = support.shape
    weight = support.new_zeros(n_episodes, n_way, dim)
    bias = support.new_zeros(n_episodes, n_way)
    for _ in range(steps):
        logits = support @ weight.transpose(1, 2) + bias.unsqueeze(1)
        grad_logits = (torch.softmax(logits, dim=-1) - targets) / n_support
        weight = weight - lr * grad_logits.transpose(1, 2) @ support
        bias = bias - lr * grad_logits.sum(dim=1)
    return weight, bias


def head_logits(query: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """Logits of per-episode linear heads: ``(E, n_query, D)`` queries (or ``(1, n_query, D)`` shared by
    all episodes), ``(E, n_way, D)`` weights and ``(E, n_way)`` biases -> ``(E, n_query, n_way)``."""
    return episode_matmul(query, weight.transpose(1, 2)) + bias.unsqueeze(1)


@register_method("anil")
class ANIL(FewShotMethod):
    """The ANIL inner loop: a zero-initialised linear head, ``steps`` full-batch gradient steps.

    Raghu, Raghu, Bengio & Vinyals, "Rapid Learning or Feature Reuse? Towards Understanding the
    Effectiveness of MAML", ICLR 2020. ANIL adapts only the head in the inner loop; this is that loop
    (``fit_linear_head``, which meta-training differentiates through), on the support features as the
    backbone gives them (no normalisation), the way an ANIL meta-trained backbone is used at test time.
    Deterministic: the head starts at zero.

    Shapes: support ``(E, n_support, D)``, query ``(E, n_query, D)``, logits ``(E, n_query, n_way)``
    (``E`` episodes, each with its own head; one episode may drop the axis).

    Args:
        steps: gradient steps on the support set.
        lr: step size.

    Attributes:
        weight_: ``(E, n_way, D)`` head weights.
        bias_: ``(E, n_way)`` head biases.
    """

    inputs = "features"

    def __init__(self, steps: int = 5, lr: float = 0.1) -> None:
        self.steps = steps
        self.lr = lr

    def check_params(self) -> None:
        require_positive("steps", self.steps, integer=True)
        require_positive("lr", self.lr)

    def _fit(self, support: Tensor, labels: Tensor) -> None:
        self.weight_, self.bias_ = fit_linear_head(support.float(), labels, self.n_way_, self.steps, self.lr)

    def _predict_logits(self, query: Tensor) -> Tensor:
        return head_logits(query.float().to(self.weight_.device), self.weight_, self.bias_)
