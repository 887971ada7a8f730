"""Score candidate configurations by the selection criteria and pick one per episode or per dataset."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fewshot_med.selection.candidates import Candidate
from fewshot_med.selection.criteria import CRITERIA, CriterionSettings

#: How a criterion's scores pick a candidate: in each episode, or once for all episodes (by the mean score).
PICK_PER = ("episode", "dataset")


def score_candidates(
    support: Tensor,
    labels: Tensor,
    n_way: int,
    candidates: Sequence[Candidate],
    criteria: Sequence[str],
    settings: CriterionSettings | None = None,
    base_feature_mean: Tensor | None = None,
) -> dict[str, Tensor]:
    """Each criterion's scores of each candidate on each episode.

    Args:
        support: ``(E, n, D)`` support features, before the candidates' transforms.
        labels: ``(E, n)`` labels.
        n_way: number of classes.
        candidates: the configurations to score.
        criteria: ``CRITERIA`` names.
        settings: the criteria's options (defaults: ``CriterionSettings()``).
        base_feature_mean: ``(D,)``, for candidates with ``centred`` features.

    Returns:
        criterion name -> ``(len(candidates), E)`` float64 scores, higher is better.
    """
    unknown = [name for name in criteria if name not in CRITERIA]
    if unknown:
        raise ValueError(f"unknown criteria {', '.join(unknown)}; choose from {', '.join(CRITERIA)}")
    settings = settings or CriterionSettings()
    scores: dict[str, list[Tensor]] = {name: [] for name in criteria}
    for candidate in candidates:
        features = candidate.transform(support.double(), _as_double(base_feature_mean))
        for name in criteria:
            scores[name].append(CRITERIA[name](features, labels, n_way, candidate.prior_precision, settings))
    return {name: torch.stack(values) for name, values in scores.items()}


def pick(scores: Tensor, per: str) -> Tensor:
    """``(E,)`` index of the chosen candidate for ``(n_candidates, E)`` scores: the best in each episode
    (``per="episode"``), or the best mean over episodes for all of them (``per="dataset"``); ties go to
    the first candidate, and a non-finite score never wins."""
    if per not in PICK_PER:
        raise ValueError(f"per must be one of {', '.join(PICK_PER)}, got {per!r}")
    finite = torch.nan_to_num(scores, nan=-torch.inf)
    if per == "episode":
        return finite.argmax(dim=0)
    return finite.mean(dim=1).argmax().expand(scores.shape[1]).clone()


def _as_double(values: Tensor | None) -> Tensor | None:
    return None if values is None else values.double()
