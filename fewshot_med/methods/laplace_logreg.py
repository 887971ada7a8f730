"""Bayesian logistic regression on frozen features (Laplace posterior, model-averaged predictions),
optionally choosing its feature transform and prior precision from the support set alone."""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Integral, Real
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from fewshot_med.methods.base import (
    FewShotMethod,
    MethodContext,
    register_method,
    require_choice,
    require_positive,
)
from fewshot_med.models.feature_transforms import FEATURE_TRANSFORMS
from fewshot_med.selection.candidates import Candidate, candidate_grid
from fewshot_med.selection.criteria import CRITERIA, CriterionSettings
from fewshot_med.selection.laplace import LaplaceFit, fit_laplace, predictive_log_probs
from fewshot_med.selection.select import PICK_PER, pick, score_candidates

if TYPE_CHECKING:
    from typing_extensions import Self

PREDICTIVES = ("probit", "map")


@register_method("laplace_logreg")
class LaplaceLogReg(FewShotMethod):
    """Multinomial logistic regression with a Gaussian prior ``N(0, λ⁻¹I)`` on its weights and bias, a
    Laplace posterior, and the Bayesian model average as its prediction.

    The posterior is exact Laplace, computed in the dual for all episodes at once
    (``fewshot_med.selection.laplace``); ``predictive="probit"`` averages the softmax over it with the
    probit approximation, ``"map"`` uses the MAP weights alone. This is last-layer Laplace on a frozen
    backbone (Daxberger et al., "Laplace Redux: Effortless Bayesian Deep Learning", NeurIPS 2021).

    ``features`` and ``prior_precision`` may be lists: every combination is a candidate, and in each
    episode (``select_per="episode"``) or once for the whole batch of episodes (``"dataset"``: one
    choice per ``fit`` call, the mean score over its episodes) the candidate with the best
    ``select_by`` criterion on the support set is used, so no validation images are needed. The
    default criterion is the conditional marginal likelihood of Lotfi, Izmailov, Benton, Goldblum &
    Wilson, "Bayesian Model Selection, the Marginal Likelihood, and Generalization", ICML 2022 (see
    ``fewshot_med.selection.criteria`` for it and the alternatives ``lml``, ``loo``, ``train_loss``).

    Shapes: support ``(E, n_support, D)``, query ``(E, n_query, D)``, log-probabilities
    ``(E, n_query, n_way)`` (one episode may drop the ``E`` axis).

    Args:
        features: ``raw``, ``l2`` or ``centred`` (base-mean-centred then L2-normalised), or a list.
        prior_precision: ``λ > 0``, or a list.
        predictive: ``probit`` (Bayesian model average) or ``map``.
        select_by: the criterion choosing among several candidates.
        select_per: ``episode`` or ``dataset``.
        orderings: random orderings averaged by ``clml``.
        conditioning: the fraction of the support set ``clml`` conditions on.
        random_state: seed of ``clml``'s orderings (defaults to the context's seed).
        base_feature_mean: ``(D,)`` mean base-class feature (from the ``MethodContext``), for ``centred``.

    Attributes:
        candidates_: the candidate configurations.
        choice_: ``(E,)`` index into ``candidates_`` of each episode's choice.
        fits_: candidate index -> (``(E_c,)`` episode indices, their ``LaplaceFit``).
    """

    inputs = "features"
    optional_context_params = ("base_feature_mean",)

    def __init__(
        self,
        features: str | Sequence[str] = "l2",
        prior_precision: float | Sequence[float] = 1.0,
        predictive: str = "probit",
        select_by: str = "clml",
        select_per: str = "episode",
        orderings: int = 10,
        conditioning: float = 0.8,
        random_state: int = 0,
        base_feature_mean: Tensor | None = None,
    ) -> None:
        self.features = features
        self.prior_precision = prior_precision
        self.predictive = predictive
        self.select_by = select_by
        self.select_per = select_per
        self.orderings = orderings
        self.conditioning = conditioning
        self.random_state = random_state
        self.base_feature_mean = base_feature_mean

    @classmethod
    def from_context(cls, context: MethodContext, **params: Any) -> Self:
        """As ``FewShotMethod.from_context``; ``random_state`` defaults to ``context.seed``."""
        return super().from_context(context, **{"random_state": context.seed, **params})

    def check_params(self) -> None:
        for name in _as_list(self.features):
            require_choice("features", name, tuple(FEATURE_TRANSFORMS))
        for value in _as_list(self.prior_precision):
            require_positive("prior_precision", value)
        require_choice("predictive", self.predictive, PREDICTIVES)
        require_choice("select_by", self.select_by, tuple(CRITERIA))
        require_choice("select_per", self.select_per, PICK_PER)
        require_positive("orderings", self.orderings, integer=True)
        conditioning = self.conditioning
        if isinstance(conditioning, bool) or not isinstance(conditioning, Real) or not 0 < conditioning < 1:
            raise ValueError(f"conditioning must be a number in (0, 1), got {conditioning!r}")
        if isinstance(self.random_state, bool) or not isinstance(self.random_state, Integral):
            raise ValueError(f"random_state must be an integer, got {self.random_state!r}")

    def check_context(self) -> None:
        if "centred" in _as_list(self.features) and self.base_feature_mean is None:
            raise ValueError(
                "features 'centred' needs the base-class mean feature, which this run does not have"
            )

    def _candidates(self) -> list[Candidate]:
        return candidate_grid(_as_list(self.features), _as_list(self.prior_precision))

    def _fit(self, support: Tensor, labels: Tensor) -> None:
        self.candidates_ = self._candidates()
        base_mean = (
            None if self.base_feature_mean is None else self.base_feature_mean.to(support.device).double()
        )
        if len(self.candidates_) == 1:
            self.choice_ = torch.zeros(len(support), dtype=torch.long, device=support.device)
        else:
            settings = CriterionSettings(self.orderings, self.conditioning, self.random_state)
            scores = score_candidates(
                support, labels, self.n_way_, self.candidates_, [self.select_by], settings, base_mean
            )
            self.choice_ = pick(scores[self.select_by], self.select_per)
        self.fits_: dict[int, tuple[Tensor, LaplaceFit]] = {}
        for index in self.choice_.unique().tolist():
            episodes = (self.choice_ == index).nonzero().squeeze(1)
            features = self.candidates_[index].transform(support[episodes].double(), base_mean)
            self.fits_[index] = (
                episodes,
                fit_laplace(features, labels[episodes], self.n_way_, self.candidates_[index].prior_precision),
            )

    def _predict_logits(self, query: Tensor) -> Tensor:
        # (1, N, D) queries are shared by every episode (broadcast, not copied)
        shared = query.shape[0] == 1 and len(self.choice_) > 1
        out = torch.empty(
            len(self.choice_), query.shape[1], self.n_way_, dtype=torch.float32, device=query.device
        )
        base_mean = (
            None if self.base_feature_mean is None else self.base_feature_mean.to(query.device).double()
        )
        for index, (episodes, fit) in self.fits_.items():
            features = self.candidates_[index].transform(
                (query if shared else query[episodes]).double(), base_mean
            )
            out[episodes] = predictive_log_probs(fit, features, self.predictive).float()
        return out


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]
