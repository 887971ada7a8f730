"""The selection stage (``fewshot-med select``): model selection without a validation set.

Every candidate configuration of the Bayesian linear head (``laplace_logreg``: a feature transform and
a prior precision, ``config.selection``) is scored on the support set of every fixed test episode by
each criterion (CLML, LML, leave-one-out, training loss; ``fewshot_med.selection.criteria``), and,
in hindsight, evaluated on the episodes' queries. Per K and criterion the stage reports how well the
criterion ranks the candidates (Spearman correlation with test accuracy, across candidates and within
episodes) and what its choice costs against the best candidate in hindsight, choosing once for the
dataset (best mean score) or in each episode. Everything goes to MLflow under a ``select`` stage run.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from scipy.stats import rankdata

from fewshot_med import tracking
from fewshot_med.config import Config
from fewshot_med.data import ClassSubset, EpisodeList
from fewshot_med.evaluation import EpisodeResults, evaluate_frozen, support_sets
from fewshot_med.evaluation.intervals import mean_ci95, paired_difference_ci95
from fewshot_med.methods.laplace_logreg import LaplaceLogReg
from fewshot_med.pipelines.episodes import draw_episodes
from fewshot_med.pipelines.evaluation import embed_subsets
from fewshot_med.pipelines.stages import StageContext
from fewshot_med.progress import Progress
from fewshot_med.selection.candidates import Candidate, candidate_grid
from fewshot_med.selection.criteria import CriterionSettings
from fewshot_med.selection.select import pick, score_candidates
from fewshot_med.tracking import names

#: A choice "lands within 1 point" of the best in hindsight when its mean test accuracy is at most
#: this many accuracy points below it.
WITHIN_POINTS = 1.0


@dataclass(frozen=True)
class CriterionOutcome:
    """How one criterion did at one K (accuracies and gaps in points, each as ``(mean, 95% half-width)``).

    Attributes:
        criterion: its ``CRITERIA`` name.
        rank_correlation: Spearman correlation, across candidates, of the mean score with the mean test
            accuracy.
        log_likelihood_correlation: the same with the mean test log-likelihood (minus the NLL), the
            quantity the likelihood-based criteria estimate.
        episode_rank_correlation: the within-episode Spearman correlation of scores with test
            accuracies, averaged over the episodes where both vary.
        dataset_pick: index of the candidate with the best mean score.
        dataset_pick_accuracy: that candidate's test accuracy.
        dataset_gap: its accuracy minus the best candidate's in hindsight, paired over episodes.
        episode_pick_accuracy: test accuracy when each episode uses its own best-scoring candidate.
        episode_gap: that minus the best candidate in hindsight, paired over episodes.
    """

    criterion: str
    rank_correlation: float
    log_likelihood_correlation: float
    episode_rank_correlation: float
    dataset_pick: int
    dataset_pick_accuracy: tuple[float, float]
    dataset_gap: tuple[float, float]
    episode_pick_accuracy: tuple[float, float]
    episode_gap: tuple[float, float]

    @property
    def within_one_point(self) -> bool:
        """Whether the dataset-level choice lands within ``WITHIN_POINTS`` of the best in hindsight."""
        return self.dataset_gap[0] >= -WITHIN_POINTS


@dataclass
class SelectionResult:
    """The selection study at one K.

    Attributes:
        k_shot: shots per class.
        candidates: the configurations compared.
        scores: criterion -> ``(n_candidates, E)`` scores (nats per support point, higher is better).
        results: per candidate, its test results on the ``E`` episodes.
        outcomes: per criterion, how it did.
    """

    k_shot: int
    candidates: list[Candidate]
    scores: dict[str, np.ndarray]
    results: list[EpisodeResults]
    outcomes: list[CriterionOutcome]

    @cached_property
    def accuracy(self) -> np.ndarray:
        """``(n_candidates, E)`` test accuracy in points."""
        return 100 * np.stack([result.values("accuracy") for result in self.results])

    @cached_property
    def best(self) -> int:
        """The candidate with the best mean test accuracy (the best in hindsight)."""
        return int(self.accuracy.mean(axis=1).argmax())

    def table(self) -> str:
        """Markdown: the candidates with their test accuracy and mean scores, then the criteria."""
        criteria = list(self.scores)
        accuracy = self.accuracy
        lines = [
            f"K = {self.k_shot}, {accuracy.shape[1]} test episodes. Candidates (mean criterion score per "
            "support point; test accuracy in hindsight):",
            "",
            "| candidate | test accuracy | " + " | ".join(criteria) + " |",
            "|---|---|" + "---|" * len(criteria),
        ]
        for index, candidate in enumerate(self.candidates):
            mean, half = mean_ci95(accuracy[index])
            marker = " (best)" if index == self.best else ""
            scores = " | ".join(f"{self.scores[name][index].mean():.3f}" for name in criteria)
            lines.append(f"| {candidate.label}{marker} | {mean:.1f} ± {half:.1f} | {scores} |")
        lines += [
            "",
            "| criterion | Spearman with accuracy (candidates) | with test log-likelihood "
            "| with accuracy (within episodes) | dataset pick | its accuracy | minus best | within 1 point "
            "| per-episode picks | minus best |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for outcome in self.outcomes:
            cells = [
                outcome.criterion,
                f"{outcome.rank_correlation:.2f}",
                f"{outcome.log_likelihood_correlation:.2f}",
                f"{outcome.episode_rank_correlation:.2f}",
                self.candidates[outcome.dataset_pick].label,
                _interval(outcome.dataset_pick_accuracy),
                _interval(outcome.dataset_gap, signed=True),
                "yes" if outcome.within_one_point else "no",
                _interval(outcome.episode_pick_accuracy),
                _interval(outcome.episode_gap, signed=True),
            ]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def scores_csv(self) -> str:
        """One row per (episode, candidate): the criteria's scores and the test accuracy."""
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["episode", "features", "prior_precision", *self.scores, "test_accuracy"])
        accuracy = self.accuracy
        for index, candidate in enumerate(self.candidates):
            for episode in range(accuracy.shape[1]):
                values = [f"{self.scores[name][index, episode]:.6g}" for name in self.scores]
                row = [episode, candidate.features, candidate.prior_precision, *values]
                writer.writerow([*row, f"{accuracy[index, episode]:.4f}"])
        return buffer.getvalue()


@dataclass
class SelectionReport:
    """The selection study at every K."""

    per_k: list[SelectionResult]

    def table(self) -> str:
        """Markdown of every K."""
        return "\n\n".join(result.table() for result in self.per_k)


def select_stage(context: StageContext) -> SelectionReport:
    """Score and evaluate every candidate of ``config.selection`` on the fixed test episodes of every K
    (the evaluate stage's episodes), under a ``select`` stage run."""
    config, data = context.config, context.data
    embedded = embed_subsets(context)
    features, pool = embedded.features, embedded.pools["test"]
    episodes = draw_episodes(config, embedded.pools, context.n_way, val=False).test
    with tracking.stage_run(names.SELECT, params=config.selection.model_dump()):
        tracking.log_dataset_input(data.dataset, "evaluation", "test", data.roles.novel)
        for k, test_episodes in episodes.items():
            tracking.log_dict_artifact(test_episodes.to_dict(), names.episodes_path("test", k))
        report = SelectionReport(
            selection_studies(
                config, features["novel_test"], pool, episodes, embedded.methods.base_feature_mean
            )
        )
        for result in report.per_k:
            _log_result(result)
    return report


def selection_studies(
    config: Config,
    features: torch.Tensor,
    pool: ClassSubset,
    episodes: dict[int, EpisodeList],
    base_feature_mean: torch.Tensor | None,
) -> list[SelectionResult]:
    """``selection_study`` at every K, with the candidates, criteria and options of ``config.selection``
    (the orderings seeded by ``config.seed``)."""
    settings = config.selection
    candidates = candidate_grid(settings.features, settings.prior_precision)
    options = CriterionSettings(settings.orderings, settings.conditioning, config.seed)
    studies = []
    with Progress("select", total=len(episodes), unit="K") as progress:
        for test_episodes in episodes.values():
            study = selection_study(
                features, pool, test_episodes, candidates, settings.criteria, options, base_feature_mean
            )
            studies.append(study)
            best = float(study.accuracy[study.best].mean())
            progress.update(len(studies), force=True, k_shot=test_episodes.k_shot, best_accuracy=best)
    return studies


def selection_study(
    features: torch.Tensor,
    pool: ClassSubset,
    episodes: EpisodeList,
    candidates: list[Candidate],
    criteria: list[str],
    options: CriterionSettings,
    base_feature_mean: torch.Tensor | None,
) -> SelectionResult:
    """Score every candidate by every criterion on the episodes' support sets, evaluate each on their
    queries, and compare the criteria's choices with the best candidate in hindsight.

    Args:
        features: ``(len(pool), D)`` embeddings of the pool the episodes come from.
        pool: that pool.
        episodes: the fixed episodes.
        candidates: the configurations.
        criteria: ``CRITERIA`` names.
        options: the criteria's options.
        base_feature_mean: ``(D,)``, for ``centred`` candidates.
    """
    support, labels = support_sets(features, pool, episodes)
    scores = score_candidates(
        support, labels, episodes.n_way, candidates, criteria, options, base_feature_mean
    )
    results = [
        evaluate_frozen(
            lambda candidate=candidate: LaplaceLogReg(
                features=candidate.features,
                prior_precision=candidate.prior_precision,
                base_feature_mean=base_feature_mean,
            ),
            features,
            pool,
            episodes,
            label=candidate.label,
        )
        for candidate in candidates
    ]
    result = SelectionResult(
        episodes.k_shot, candidates, {n: s.cpu().numpy() for n, s in scores.items()}, results, []
    )
    nll = np.stack([candidate.values("nll") for candidate in results])
    result.outcomes = [
        _outcome(name, result.scores[name], result.accuracy, nll, result.best) for name in criteria
    ]
    return result


def _outcome(
    criterion: str, scores: np.ndarray, accuracy: np.ndarray, nll: np.ndarray, best: int
) -> CriterionOutcome:
    dataset_pick = int(pick(torch.from_numpy(scores), "dataset")[0])
    episode_picks = pick(torch.from_numpy(scores), "episode").numpy()
    picked = accuracy[episode_picks, np.arange(accuracy.shape[1])]
    return CriterionOutcome(
        criterion=criterion,
        rank_correlation=_spearman(scores.mean(axis=1)[:, None], accuracy.mean(axis=1)[:, None])[0],
        log_likelihood_correlation=_spearman(scores.mean(axis=1)[:, None], -nll.mean(axis=1)[:, None])[0],
        episode_rank_correlation=float(np.nanmean(_spearman(scores, accuracy))),
        dataset_pick=dataset_pick,
        dataset_pick_accuracy=mean_ci95(accuracy[dataset_pick]),
        dataset_gap=paired_difference_ci95(accuracy[dataset_pick], accuracy[best]),
        episode_pick_accuracy=mean_ci95(picked),
        episode_gap=paired_difference_ci95(picked, accuracy[best]),
    )


def _spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per column, the Spearman correlation of two ``(n, m)`` arrays (NaN where a column is constant)."""
    ranks_a, ranks_b = rankdata(a, axis=0), rankdata(b, axis=0)
    ranks_a -= ranks_a.mean(axis=0)
    ranks_b -= ranks_b.mean(axis=0)
    norm = np.sqrt((ranks_a**2).sum(axis=0) * (ranks_b**2).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norm > 0, (ranks_a * ranks_b).sum(axis=0) / np.where(norm > 0, norm, 1), np.nan)


def _interval(value: tuple[float, float], signed: bool = False) -> str:
    mean, half = value
    return f"{mean:+.1f} ± {half:.1f}" if signed else f"{mean:.1f} ± {half:.1f}"


def _log_result(result: SelectionResult) -> None:
    k = result.k_shot
    metrics: dict[str, float] = {}
    for outcome in result.outcomes:
        fields = {
            "rank_correlation": outcome.rank_correlation,
            "log_likelihood_correlation": outcome.log_likelihood_correlation,
            "episode_rank_correlation": outcome.episode_rank_correlation,
            "dataset_pick_accuracy": outcome.dataset_pick_accuracy[0],
            "dataset_gap": outcome.dataset_gap[0],
            "within_one_point": float(outcome.within_one_point),
            "episode_pick_accuracy": outcome.episode_pick_accuracy[0],
            "episode_gap": outcome.episode_gap[0],
        }
        metrics |= {
            names.select_metric(k, outcome.criterion, field): value for field, value in fields.items()
        }
    metrics[names.select_metric(k, None, "best_accuracy")] = float(result.accuracy[result.best].mean())
    tracking.log_metrics(metrics)
    tracking.log_text_artifact(result.table(), names.selection_table_path(k))
    tracking.log_text_artifact(result.scores_csv(), names.selection_scores_path(k))
