"""Logistic-regression linear probe on frozen features, solved for many episodes at once."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from sklearn.exceptions import ConvergenceWarning
from torch import Tensor

from fewshot_med.methods.base import FewShotMethod, episode_matmul, register_method, require_positive

#: episodes per Newton solve are chunked so that ``E · m²`` stays below this many float64 entries
_MAX_SYSTEM_ENTRIES = 25_000_000


@register_method("logreg")
class LogReg(FewShotMethod):
    """Multinomial logistic regression with an L2 penalty on L2-normalised features.

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

    def __init__(self, C: float = 1.0, max_iter: int = 100, tol: float = 1e-8) -> None:
        self.C = C
        self.max_iter = max_iter
        self.tol = tol

    def check_params(self) -> None:
        require_positive("C", self.C)
        require_positive("max_iter", self.max_iter, integer=True)
        require_positive("tol", self.tol)

    def _fit(self, support: Tensor, labels: Tensor) -> None:
        x = F.normalize(support.float(), dim=-1)
        gram = (x @ x.transpose(1, 2)).double()  # the solve needs only the (E, n, n) Gram matrices
        targets = F.one_hot(labels, self.n_way_).double()
        n_unknowns = x.shape[1] * self.n_way_ + self.n_way_ - 1
        chunk = max(1, _MAX_SYSTEM_ENTRIES // n_unknowns**2)
        solved = [self._solve(gram[i : i + chunk], targets[i : i + chunk]) for i in range(0, len(x), chunk)]
        self.dual_coef_ = torch.cat([a for a, _, _ in solved])
        self.intercept_ = torch.cat([b for _, b, _ in solved])
        self.n_iter_ = max(n for _, _, n in solved)
        self.coef_ = x.transpose(1, 2) @ self.dual_coef_.float()

    def _predict_logits(self, query: Tensor) -> Tensor:
        q = F.normalize(query.float().to(self.coef_.device), dim=-1)
        return episode_matmul(q, self.coef_) + self.intercept_.float().unsqueeze(1)

    def _penalty_inverse(self) -> float:
        """The ``C`` of the multinomial objective: ``C / 2`` for two classes (see the class docstring)."""
        return self.C / 2 if self.n_way_ == 2 else self.C

    def _objective(self, gram: Tensor, targets: Tensor, a: Tensor, b: Tensor) -> Tensor:
        """``(E,)`` values of ``C · Σ CE + ½ tr(Aᵀ K A)`` (``= ½‖W‖²``)."""
        logits = gram @ a + b.unsqueeze(1)
        cross_entropy = -(targets * torch.log_softmax(logits, dim=-1)).sum(dim=(1, 2))
        return self._penalty_inverse() * cross_entropy + 0.5 * (a * (gram @ a)).sum(dim=(1, 2))

    def _solve(self, gram: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, int]:
        """Newton with backtracking for ``E`` episodes from their ``(E, n, n)`` float64 Gram matrices:
        ``(A (E, n, W), b (E, W), iterations)``."""
        n_episodes, n, n_way = targets.shape
        c = self._penalty_inverse()
        a = torch.zeros_like(targets)
        b = torch.zeros(n_episodes, n_way, dtype=gram.dtype, device=gram.device)
        eye = torch.eye(n * n_way, dtype=gram.dtype, device=gram.device)
        for iteration in range(1, self.max_iter + 1):
            probs = torch.softmax(gram @ a + b.unsqueeze(1), dim=-1)
            residual = torch.cat(
                [(a - c * (targets - probs)).flatten(1), (probs - targets).sum(dim=1)[:, 1:]], dim=1
            )
            if residual.abs().max() < self.tol:
                return a, b, iteration - 1
            # softmax Jacobians J_i = diag(p_i) - p_i p_iᵀ, (E, n, W, W)
            jac = torch.diag_embed(probs) - probs.unsqueeze(-1) * probs.unsqueeze(-2)
            d_a_a = eye + c * torch.einsum("eicd,eij->eicjd", jac, gram).reshape(n_episodes, n * n_way, -1)
            d_a_b = c * jac[..., 1:].reshape(n_episodes, n * n_way, n_way - 1)
            d_b_a = torch.einsum("eicd,eij->ecjd", jac, gram)[:, 1:].reshape(n_episodes, n_way - 1, -1)
            d_b_b = jac.sum(dim=1)[:, 1:, 1:]
            system = torch.cat([torch.cat([d_a_a, d_a_b], dim=2), torch.cat([d_b_a, d_b_b], dim=2)], dim=1)
            step = torch.linalg.solve(system, -residual)
            step_a = step[:, : n * n_way].reshape(n_episodes, n, n_way)
            step_b = F.pad(step[:, n * n_way :], (1, 0))
            a, b = self._line_search(gram, targets, a, b, step_a, step_b)
        warnings.warn(
            f"logreg: Newton did not converge in {self.max_iter} iterations; raise max_iter",
            ConvergenceWarning,
            stacklevel=4,
        )
        return a, b, self.max_iter

    def _line_search(
        self, gram: Tensor, targets: Tensor, a: Tensor, b: Tensor, step_a: Tensor, step_b: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Per episode, the largest step ``2⁻ᵏ`` (k < 30) that does not increase the objective (beyond
        float64 rounding, so the tiny last steps near the optimum are taken)."""
        current = self._objective(gram, targets, a, b)
        slack = 1e-12 * current.abs().clamp(min=1.0)
        size = torch.ones(len(a), dtype=a.dtype, device=a.device)
        pending = torch.ones(len(a), dtype=torch.bool, device=a.device)
        for _ in range(30):
            trial = self._objective(
                gram, targets, a + size[:, None, None] * step_a, b + size[:, None] * step_b
            )
            pending = pending & (trial > current + slack)
            if not pending.any():
                break
            size = torch.where(pending, size / 2, size)
        size = torch.where(pending, torch.zeros_like(size), size)
        return a + size[:, None, None] * step_a, b + size[:, None] * step_b
