"""ANIL test-time adaptation: a linear head trained by a few gradient steps on frozen features."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fewshot_med.methods.base import FewShotMethod, episode_matmul, register_method, require_positive


@register_method("anil")
class ANIL(FewShotMethod):
    """The ANIL inner loop: a zero-initialised linear head, ``steps`` full-batch gradient steps.

    Raghu, Raghu, Bengio & Vinyals, "Rapid Learning or Feature Reuse? Towards Understanding the
    Effectiveness of MAML", ICLR 2020. ANIL adapts only the head in the inner loop; this is that loop,
    on the support features as the backbone gives them (no normalisation), the way an ANIL
    meta-trained backbone is used at test time. Plain gradient descent on the mean cross-entropy, with
    the gradient written out (``∂/∂logits = (softmax - one_hot) / n``), so it also runs inside
    ``torch.inference_mode``. Deterministic: the head starts at zero.

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
        x = support.float()
        targets = F.one_hot(labels, self.n_way_).float()
        n_episodes, n_support, dim = x.shape
        self.weight_ = torch.zeros(n_episodes, self.n_way_, dim, device=x.device)
        self.bias_ = torch.zeros(n_episodes, self.n_way_, device=x.device)
        for _ in range(self.steps):
            logits = x @ self.weight_.transpose(1, 2) + self.bias_.unsqueeze(1)
            grad_logits = (torch.softmax(logits, dim=-1) - targets) / n_support
            self.weight_ -= self.lr * grad_logits.transpose(1, 2) @ x
            self.bias_ -= self.lr * grad_logits.sum(dim=1)

    def _predict_logits(self, query: Tensor) -> Tensor:
        return episode_matmul(
            query.float().to(self.weight_.device), self.weight_.transpose(1, 2)
        ) + self.bias_.unsqueeze(1)
