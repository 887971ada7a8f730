"""Logistic-regression linear probe on frozen features (scikit-learn)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fewshot_med.methods.base import FewShotMethod, register_method, require_positive


@register_method("logreg")
class LogReg(FewShotMethod):
    """Multinomial logistic regression with an L2 penalty on L2-normalised features.

    The linear-probe baseline of transfer-learning few-shot work, e.g. Tian, Wang, Krishnan,
    Tenenbaum & Isola, "Rethinking Few-Shot Image Classification: a Good Embedding Is All You Need?",
    ECCV 2020. Fitted with scikit-learn's ``LogisticRegression`` (lbfgs, which is deterministic).
    The logits are its ``decision_function``; for two classes, whose decision function is the single
    log-odds ``f``, they are ``(-f / 2, f / 2)``, so a softmax gives ``predict_proba`` in every case.

    Shapes: support ``(n_support, D)``, query ``(n_query, D)``, logits ``(n_query, n_way)``.

    Args:
        C: inverse strength of the L2 penalty.
        max_iter: lbfgs iterations.

    Attributes:
        model_: the fitted ``sklearn.linear_model.LogisticRegression``.
    """

    inputs = "features"

    def __init__(self, C: float = 1.0, max_iter: int = 1000) -> None:
        self.C = C
        self.max_iter = max_iter

    def check_params(self) -> None:
        require_positive("C", self.C)
        require_positive("max_iter", self.max_iter, integer=True)

    def _fit(self, support: Tensor, labels: Tensor) -> None:
        from sklearn.linear_model import LogisticRegression  # slow import, only when used

        features = F.normalize(support.double(), dim=1).cpu().numpy()
        self.model_ = LogisticRegression(C=self.C, max_iter=self.max_iter).fit(features, labels.cpu().numpy())

    def _predict_logits(self, query: Tensor) -> Tensor:
        features = F.normalize(query.double(), dim=1).cpu().numpy()
        scores = torch.from_numpy(self.model_.decision_function(features))
        if scores.ndim == 1:
            scores = torch.stack([-scores / 2, scores / 2], dim=1)
        return scores
