"""R2-D2: a closed-form ridge-regression head on frozen features."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fewshot_med.methods.base import (
    FewShotMethod,
    episode_matmul,
    register_method,
    require_base_mean_for,
    require_feature_transform,
    require_positive,
)
from fewshot_med.models.feature_transforms import transform_features
from fewshot_med.models.linalg import solve


@register_method("r2d2")
class R2D2(FewShotMethod):
    """Ridge regression onto one-hot targets, solved in closed form in the dual.

    Bertinetto, Henriques, Torr & Vedaldi, "Meta-learning with differentiable closed-form solvers",
    ICLR 2019. With transformed (by default L2-normalised) support features ``X`` ``(n, D)`` and
    one-hot targets ``Y`` ``(n, n_way)``, the ridge weights ``W = (XᵀX + λI)⁻¹ XᵀY`` equal, by the
    Woodbury identity, ``W = Xᵀ (XXᵀ + λI)⁻¹ Y``: an ``n x n`` system instead of ``D x D``, since
    ``n ≪ D`` in few-shot tasks. Logits are ``scale · transform(Q) W``; R2-D2 learns this scale
    during meta-training, here it is fixed. The ``n x n`` systems are solved in float64
    (``fewshot_med.models.linalg.solve``); features, weights and query scores are float32 (the
    precision of the returned logits).

    Shapes: support ``(E, n_support, D)``, query ``(E, n_query, D)``, logits ``(E, n_query, n_way)``
    (``E`` episodes, each solved separately; one episode may drop the axis).

    Args:
        features: the ``FEATURE_TRANSFORMS`` entry applied first (``centred`` needs the base mean).
        lam: the ridge penalty λ.
        scale: multiplies the regression outputs (about 0 or 1) into logits.

    Attributes:
        coef_: ``(E, D, n_way)`` ridge weights ``W``.
    """

    inputs = "features"
    optional_context_params = ("base_feature_mean",)

    def __init__(
        self,
        features: str = "l2",
        lam: float = 1.0,
        scale: float = 10.0,
        base_feature_mean: Tensor | None = None,
    ) -> None:
        self.features = features
        self.base_feature_mean = base_feature_mean
        self.lam = lam
        self.scale = scale

    def check_params(self) -> None:
        require_feature_transform(self.features)
        require_positive("lam", self.lam)
        require_positive("scale", self.scale)

    def check_context(self) -> None:
        require_base_mean_for(self.features, self.base_feature_mean)

    def _fit(self, support: Tensor, labels: Tensor) -> None:
        x = transform_features(self.features, support, self.base_feature_mean)
        targets = F.one_hot(labels, self.n_way_).double()
        eye = torch.eye(x.shape[1], dtype=torch.float64, device=x.device)
        gram = (x @ x.transpose(1, 2)).double() + self.lam * eye
        self.coef_ = x.transpose(1, 2) @ solve(gram, targets).float()

    def _predict_logits(self, query: Tensor) -> Tensor:
        query = transform_features(self.features, query.to(self.coef_.device), self.base_feature_mean)
        return self.scale * episode_matmul(query, self.coef_)
