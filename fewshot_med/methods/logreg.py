"""Logistic-regression linear probe on frozen features, solved for many episodes at once."""

from __future__ import annotations

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
from fewshot_med.models.dual_logreg import solve_dual
from fewshot_med.models.feature_transforms import transform_features


@register_method("logreg")
class LogReg(FewShotMethod):
    """Multinomial logistic regression with an L2 penalty, on L2-normalised features by default.

    The linear-probe baseline of transfer-learning few-shot work, e.g. Tian, Wang, Krishnan,
    Tenenbaum & Isola, "Rethinking Few-Shot Image Classification: a Good Embedding Is All You Need?",
    ECCV 2020. The objective is scikit-learn's ``LogisticRegression(C=C)`` (multinomial, unpenalised
    intercept): ``C · Σ_i CE(W x_i + b, y_i) + ½‖W‖²``, and the fitted probabilities match its
    ``predict_proba``. For two classes scikit-learn fits the binary model, one weight vector ``w``
    with penalty ``½‖w‖²``; the two-row multinomial optimum has ``W = (-w/2, w/2)``, a penalty of
    ``¼‖w‖²``, so two-class episodes are solved with ``C / 2`` to give that same model.

    It is solved in the dual, exactly and for all episodes at once: at the optimum
    ``W = Aᵀ X`` with ``A = C (Y - P)`` (``X`` the ``(n, D)`` support features, ``Y`` one-hot, ``P``
    the predicted probabilities), so with the Gram matrix ``K = XXᵀ`` the logits are ``K A + b`` and
    the unknowns are ``n · n_way + n_way - 1`` numbers (``b_0 = 0`` fixes the softmax's free shift)
    instead of ``D · n_way``. Newton's method on these optimality conditions takes the same steps as
    Newton on the convex objective; a backtracking line search on the objective makes it converge
    from zero. The Newton solve runs in float64 on the Gram matrices (computed in float32, like the
    weights ``Xᵀ A`` and the query scores: float32 is the precision of the returned logits).

    Shapes: support ``(E, n_support, D)``, query ``(E, n_query, D)``, logits ``(E, n_query, n_way)``
    (``E`` episodes, each solved separately; one episode may drop the axis).

    Args:
        features: the ``FEATURE_TRANSFORMS`` entry applied first (``raw`` is scikit-learn's default
            probe; ``centred`` needs the base mean).
        C: inverse strength of the L2 penalty.
        max_iter: Newton iterations.
        tol: stop when every optimality residual is below this.

    Attributes:
        dual_coef_: ``(E, n_support, n_way)`` the dual coefficients ``A``.
        coef_: ``(E, D, n_way)`` float32 weights ``Wᵀ = Xᵀ A``.
        intercept_: ``(E, n_way)`` the intercepts ``b`` (``b_0 = 0``).
        n_iter_: Newton iterations used (the most over episodes).
    """

    inputs = "features"
    optional_context_params = ("base_feature_mean",)

    def __init__(
        self,
        features: str = "l2",
        C: float = 1.0,
        max_iter: int = 100,
        tol: float = 1e-8,
        base_feature_mean: Tensor | None = None,
    ) -> None:
        self.features = features
        self.base_feature_mean = base_feature_mean
        self.C = C
        self.max_iter = max_iter
        self.tol = tol

    def check_params(self) -> None:
        require_feature_transform(self.features)
        require_positive("C", self.C)
        require_positive("max_iter", self.max_iter, integer=True)
        require_positive("tol", self.tol)

    def check_context(self) -> None:
        require_base_mean_for(self.features, self.base_feature_mean)

    def _fit(self, support: Tensor, labels: Tensor) -> None:
        x = transform_features(self.features, support, self.base_feature_mean)
        gram = (x @ x.transpose(1, 2)).double()  # the solve needs only the (E, n, n) Gram matrices
        targets = F.one_hot(labels, self.n_way_).double()
        self.dual_coef_, self.intercept_, self.n_iter_ = solve_dual(
            gram, targets, self._penalty_inverse(), intercept=True, max_iter=self.max_iter, tol=self.tol
        )
        self.coef_ = x.transpose(1, 2) @ self.dual_coef_.float()

    def _predict_logits(self, query: Tensor) -> Tensor:
        q = transform_features(self.features, query.to(self.coef_.device), self.base_feature_mean)
        return episode_matmul(q, self.coef_) + self.intercept_.float().unsqueeze(1)

    def _penalty_inverse(self) -> float:
        """The ``C`` of the multinomial objective: ``C / 2`` for two classes (see the class docstring)."""
        return self.C / 2 if self.n_way_ == 2 else self.C
