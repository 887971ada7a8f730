"""Multinomial logistic regression with an L2 penalty, solved in the dual for many episodes at once
(the solver of the ``logreg`` method and of the Laplace posterior in ``fewshot_med.selection``)."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from fewshot_med.models.linalg import solve

#: episodes per Newton solve are chunked so that ``E · m²`` stays below this many float64 entries
_MAX_SYSTEM_ENTRIES = 25_000_000


def solve_dual(
    gram: Tensor,
    targets: Tensor,
    inverse_penalty: float,
    intercept: bool = True,
    max_iter: int = 100,
    tol: float = 1e-8,
) -> tuple[Tensor, Tensor, int]:
    """Minimise ``C · Σ_i CE(K A + b, y_i) + ½ tr(Aᵀ K A)`` for ``E`` episodes at once, by Newton's method
    with a backtracking line search on the dual optimality conditions (see
    ``fewshot_med.methods.logreg.LogReg``).

    Args:
        gram: ``(E, n, n)`` float64 Gram matrices ``K = XXᵀ`` of the support features.
        targets: ``(E, n, W)`` one-hot float64 labels.
        inverse_penalty: ``C`` (> 0).
        intercept: fit an unpenalised intercept ``b`` (with ``b_0 = 0``); without one ``b = 0``.
        max_iter: Newton iterations.
        tol: stop when every optimality residual is below this.

    Returns:
        ``(A (E, n, W), b (E, W), iterations)``: the dual coefficients (``W = Xᵀ A``), the intercepts,
        and the most Newton iterations any episode needed. Episodes are solved in chunks that keep the
        Newton systems below ``_MAX_SYSTEM_ENTRIES`` float64 entries; the systems are not symmetric and
        are solved by ``fewshot_med.models.linalg.solve`` (batched LU that multi-threaded oneMKL
        does not break).
    """
    n_unknowns = targets.shape[1] * targets.shape[2] + (targets.shape[2] - 1 if intercept else 0)
    chunk = max(1, _MAX_SYSTEM_ENTRIES // n_unknowns**2)
    solved = [
        _solve_chunk(gram[i : i + chunk], targets[i : i + chunk], inverse_penalty, intercept, max_iter, tol)
        for i in range(0, len(gram), chunk)
    ]
    return (
        torch.cat([a for a, _, _ in solved]),
        torch.cat([b for _, b, _ in solved]),
        max((n for _, _, n in solved), default=0),
    )


def newton_matrix(gram: Tensor, probs: Tensor, inverse_penalty: float) -> Tensor:
    """``I + C · G (K ⊗ I_W)``, ``(E, n·W, n·W)``: the Jacobian of the dual optimality conditions in ``A``,
    with ``G`` block-diagonal of the softmax Jacobians ``diag(p_i) - p_i p_iᵀ`` of the ``(E, n, W)``
    probabilities; rows and columns are ordered (point, class)."""
    n_episodes, n, n_way = probs.shape
    jac = torch.diag_embed(probs) - probs.unsqueeze(-1) * probs.unsqueeze(-2)
    coupling = torch.einsum("eicd,eij->eicjd", jac, gram).reshape(n_episodes, n * n_way, n * n_way)
    return torch.eye(n * n_way, dtype=gram.dtype, device=gram.device) + inverse_penalty * coupling


def _solve_chunk(
    gram: Tensor, targets: Tensor, c: float, intercept: bool, max_iter: int, tol: float
) -> tuple[Tensor, Tensor, int]:
    n_episodes, n, n_way = targets.shape
    a = torch.zeros_like(targets)
    b = torch.zeros(n_episodes, n_way, dtype=gram.dtype, device=gram.device)
    for iteration in range(1, max_iter + 1):
        probs = torch.softmax(gram @ a + b.unsqueeze(1), dim=-1)
        residual = (a - c * (targets - probs)).flatten(1)
        if intercept:
            residual = torch.cat([residual, (probs - targets).sum(dim=1)[:, 1:]], dim=1)
        if residual.abs().max() < tol:
            return a, b, iteration - 1
        system = newton_matrix(gram, probs, c)
        if intercept:
            jac = torch.diag_embed(probs) - probs.unsqueeze(-1) * probs.unsqueeze(-2)
            d_a_b = c * jac[..., 1:].reshape(n_episodes, n * n_way, n_way - 1)
            d_b_a = torch.einsum("eicd,eij->ecjd", jac, gram)[:, 1:].reshape(n_episodes, n_way - 1, -1)
            d_b_b = jac.sum(dim=1)[:, 1:, 1:]
            system = torch.cat([torch.cat([system, d_a_b], dim=2), torch.cat([d_b_a, d_b_b], dim=2)], dim=1)
        step = solve(system, -residual)
        step_a = step[:, : n * n_way].reshape(n_episodes, n, n_way)
        step_b = F.pad(step[:, n * n_way :], (1, 0)) if intercept else torch.zeros_like(b)
        a, b = _line_search(gram, targets, c, a, b, step_a, step_b)
    from sklearn.exceptions import ConvergenceWarning  # imported here: sklearn takes seconds to import

    warnings.warn(
        f"logistic regression: Newton did not converge in {max_iter} iterations; raise max_iter",
        ConvergenceWarning,
        stacklevel=4,
    )
    return a, b, max_iter


def _objective(gram: Tensor, targets: Tensor, c: float, a: Tensor, b: Tensor) -> Tensor:
    """``(E,)`` values of ``C · Σ CE + ½ tr(Aᵀ K A)`` (``= ½‖W‖²``)."""
    logits = gram @ a + b.unsqueeze(1)
    cross_entropy = -(targets * torch.log_softmax(logits, dim=-1)).sum(dim=(1, 2))
    return c * cross_entropy + 0.5 * (a * (gram @ a)).sum(dim=(1, 2))


def _line_search(
    gram: Tensor, targets: Tensor, c: float, a: Tensor, b: Tensor, step_a: Tensor, step_b: Tensor
) -> tuple[Tensor, Tensor]:
    """Per episode, the largest step ``2⁻ᵏ`` (k < 30) that does not increase the objective (beyond
    float64 rounding, so the tiny last steps near the optimum are taken)."""
    current = _objective(gram, targets, c, a, b)
    slack = 1e-12 * current.abs().clamp(min=1.0)
    size = torch.ones(len(a), dtype=a.dtype, device=a.device)
    pending = torch.ones(len(a), dtype=torch.bool, device=a.device)
    for _ in range(30):
        trial = _objective(gram, targets, c, a + size[:, None, None] * step_a, b + size[:, None] * step_b)
        pending = pending & (trial > current + slack)
        if not pending.any():
            break
        size = torch.where(pending, size / 2, size)
    size = torch.where(pending, torch.zeros_like(size), size)
    return a + size[:, None, None] * step_a, b + size[:, None] * step_b
