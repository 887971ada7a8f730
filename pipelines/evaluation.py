"""The evaluation stage: every method on the fixed test episodes, calibrated, plotted and tracked.

Per method and K: the uncalibrated results, then one row per configured calibrator (a temperature fitted
on val-split episodes, and a per-episode temperature from leave-one-out on the support set). The
oracle and the generalised (base + novel) setting follow the guide's protocol. Everything goes to
MLflow: summary metrics named ``test.<K>shot.<method>[.<calibration>].<metric>`` on the pipeline run
(and without the method on its nested run, so the compare view lines methods up), per-episode CSVs,
the episode lists, plots, and the summary table as markdown and CSV; every name comes from
``fewshot_med.tracking.names``.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch

from fewshot_med import tracking
from fewshot_med.config import Config, EvaluationConfig, MethodConfig, search_combinations
from fewshot_med.data import ClassSubset, EpisodeList
from fewshot_med.data.transforms import to_model_input
from fewshot_med.errors import FewshotMedError
from fewshot_med.evaluation import (
    GENERALISED_METRICS,
    EpisodeResults,
    evaluate_frozen,
    evaluate_generalised,
    evaluate_images,
    evaluate_oracle,
)
from fewshot_med.evaluation.calibration import CALIBRATION_SETTINGS
from fewshot_med.evaluation.report import (
    best_calibration_table,
    failed_methods_table,
    markdown_table,
    paired_difference_table,
    summary_csv,
    summary_rows,
)
from fewshot_med.evaluation.selective import risk_coverage_curve
from fewshot_med.methods import METHODS, MethodContext, create_method
from fewshot_med.models import embed
from fewshot_med.pipelines.episodes import Episodes, draw_episodes
from fewshot_med.pipelines.stages import StageContext, world_tags
from fewshot_med.progress import Progress
from fewshot_med.tracking import names
from fewshot_med.training import distributed


@dataclass
class EvaluationReport:
    """Everything the evaluation stage measured (``validation``: uncalibrated results on the val
    episodes by (method, test K), which calibration and model selection use; ``base_feature_mean``:
    the ``(D,)`` mean base-class train feature the methods were given; ``failed``: method label ->
    one-line reason, for the methods whose evaluation raised and that have no results)."""

    few_shot: list[EpisodeResults]
    generalised: list[EpisodeResults]
    validation: dict[tuple[str, int], EpisodeResults] = field(default_factory=dict)
    base_feature_mean: torch.Tensor | None = None
    failed: dict[str, str] = field(default_factory=dict)

    def table(self) -> str:
        """Markdown: few-shot results, the best calibrator per setting, generalised results, then the
        methods that failed."""
        text = markdown_table(self.few_shot)
        if any(result.calibration != "none" for result in self.few_shot):
            text += "\n\nLowest pooled test ECE per method and K:\n\n" + best_calibration_table(self.few_shot)
        text += "\n\nPaired differences on the same episodes (uncalibrated):\n\n"
        text += paired_difference_table(self.few_shot)
        if self.generalised:
            text += "\n\nGeneralised (base + novel classes):\n\n"
            text += markdown_table(self.generalised, GENERALISED_METRICS)
        if self.failed:
            text += "\n\nFailed methods (no results; their runs are FAILED):\n\n"
            text += failed_methods_table(self.failed)
        return text


def _prefix(episodes: EpisodeList, limit: int | None) -> EpisodeList:
    """The first ``limit`` episodes (the same tasks every method sees first)."""
    if limit is None or limit >= len(episodes):
        return episodes
    return dataclasses.replace(episodes, episodes=episodes.episodes[:limit])


def calibrated_variants(
    test: EpisodeResults, val: EpisodeResults | None, settings: EvaluationConfig
) -> list[EpisodeResults]:
    """``test`` re-scored by every configured calibrator that applies (val results present for
    ``val_temperature``; leave-one-out logits present, i.e. K ≥ 2 and frozen features, for
    ``loo_temperature``)."""
    t_min, t_max = settings.temperature_bounds
    variants = (CALIBRATION_SETTINGS[name](test, val, t_min, t_max) for name in settings.calibration)
    return [variant for variant in variants if variant is not None]


#: The (role, split) image sets the evaluation embeds, keyed ``<role>_<split>``.
EVALUATION_SUBSETS = (
    ("base", "train"),
    ("base", "test"),
    ("novel", "train"),
    ("novel", "val"),
    ("novel", "test"),
)


@dataclass(frozen=True)
class Embedded:
    """Every image the evaluation uses, embedded once: the subsets (``EVALUATION_SUBSETS``, keyed
    ``<role>_<split>``), their ``(n, D)`` features, and the methods' context."""

    subsets: dict[str, ClassSubset]
    features: dict[str, torch.Tensor]
    methods: MethodContext

    @property
    def pools(self) -> dict[str, ClassSubset]:
        """The novel-class images episodes are drawn from: ``{"test": ..., "val": ...}``."""
        return {"test": self.subsets["novel_test"], "val": self.subsets["novel_val"]}


def embed_subsets(context: StageContext) -> Embedded:
    """Embed every image the evaluation uses once, and build the methods' context (base-class mean
    feature, backbone, device, seed, and the pretraining's SWAG posterior if any).

    Under ``torchrun`` every rank must call it, at the same point: each takes rank 0's weights
    (``distributed.broadcast_state``) and embeds its contiguous ``distributed.share`` of every subset
    (in ``EVALUATION_SUBSETS`` order, so the collective calls match); ``distributed.gather_rows`` gives
    every rank the whole ``(n, D)`` features, in order. In eval mode an image's features do not depend
    on its batch, so they equal one process's. One process makes no collective call.
    """
    backbone, spec = context.trained()
    distributed.broadcast_state(backbone)  # every rank embeds with rank 0's weights
    subsets = {f"{role}_{split}": context.data.subset(split, role) for role, split in EVALUATION_SUBSETS}
    batch_size, compile_backbone = context.config.evaluation.batch_size, context.config.runtime.compile
    features = {
        name: distributed.gather_rows(
            embed(
                backbone, distributed.share(subset.images), spec, context.device, batch_size, compile_backbone
            )
        )
        for name, subset in subsets.items()
    }
    return Embedded(subsets, features, context.method_context(features["base_train"].mean(dim=0)))


def evaluate_stage(context: StageContext) -> EvaluationReport:
    """Every configured method on the fixed test episodes of every K, calibrated, plus the oracle and
    the generalised rows; the pretraining's SWAG posterior, if any, reaches the methods' context.

    Frozen-feature methods use embeddings computed once per image and fit all episodes in one batched
    call; fine-tuning methods get images, one episode at a time. Under ``torchrun`` the ranks share the
    embedding (``embed_subsets``, which the other ranks call instead of this stage) and rank 0 alone
    runs this stage, whose run is tagged with the group's size and backend.

    A method whose own evaluation raises (anything but a ``FewshotMedError``, which is the user's to
    fix, or Ctrl-C) is contained: its nested run ends FAILED with the reason in its ``error`` tag, a
    one-line warning names it, the report lists it (``EvaluationReport.failed``) and the other
    methods go on; the evaluate and pipeline runs end FINISHED, tagged ``failed_methods``. The command
    exits 0: of eight methods, the seven that ran are the results the user wants, and the warning, the
    tag and the report say what is missing. Registration never picks a failed method.
    """
    config, data = context.config, context.data
    embedded = embed_subsets(context)
    subsets, features, methods_context = embedded.subsets, embedded.features, embedded.methods
    episodes = draw_episodes(config, embedded.pools, context.n_way)
    report = EvaluationReport(
        few_shot=[], generalised=[], base_feature_mean=methods_context.base_feature_mean
    )
    with tracking.stage_run(names.EVALUATE, tags=world_tags(), params=_evaluation_params(config)):
        tracking.log_dataset_input(data.dataset, "evaluation", "test", data.roles.novel)
        if episodes.val is not None:
            tracking.log_dataset_input(data.dataset, "validation", "val", data.roles.novel)
        for k, test_episodes in episodes.test.items():
            tracking.log_dict_artifact(test_episodes.to_dict(), names.episodes_path("test", k))
            if episodes.val is not None:
                tracking.log_dict_artifact(episodes.val[k].to_dict(), names.episodes_path("val", k))
        with Progress("evaluate", total=len(config.methods), unit="method") as progress:
            for done, method in enumerate(config.methods, start=1):
                outcome = _evaluate_contained(method, methods_context, features, subsets, episodes, config)
                if isinstance(outcome, str):
                    report.failed[method.display_name] = outcome
                    warnings.warn(
                        f"method '{method.display_name}' failed and is left out of the results: {outcome}",
                        stacklevel=2,
                    )
                    progress.update(done, force=True)
                    continue
                results, generalised, validation = outcome
                report.few_shot += results
                report.generalised += generalised
                report.validation.update(validation)
                accuracy = {
                    f"{method.display_name}_{r.k_shot}shot_acc": r.summary()["accuracy"][0]
                    for r in results
                    if r.calibration == "none"
                }
                progress.update(done, force=True, **accuracy)
        if report.failed:
            failed = {names.FAILED_METHODS_TAG: names.list_value(report.failed)}
            tracking.set_tags(failed)
            tracking.set_tags(failed, run_id=tracking.pipeline_run_id())
        if config.evaluation.oracle:
            oracle = evaluate_oracle_rows(features, subsets, episodes, config.evaluation)
            tags = _method_tags(names.ORACLE, episodes.test)
            with tracking.stage_run(names.method_stage(names.ORACLE), tags=tags):
                _log_method(names.ORACLE, oracle, [], config.evaluation)
            report.few_shot += oracle
        _log_report(report, config.evaluation)
    return report


MethodOutcome = tuple[list[EpisodeResults], list[EpisodeResults], dict[tuple[str, int], EpisodeResults]]


def _evaluate_contained(
    method: MethodConfig,
    context: MethodContext,
    features: dict[str, torch.Tensor],
    subsets: dict[str, ClassSubset],
    episodes: Episodes,
    config: Config,
) -> MethodOutcome | str:
    """``evaluate_method`` and its logging in the method's nested run; when the evaluation itself
    raises (not a ``FewshotMedError``), the run ends FAILED (the reason in its ``error`` tag) and the
    one-line reason, paths redacted, is returned instead of the results."""
    label = method.display_name
    failure: Exception | None = None
    try:
        with tracking.stage_run(names.method_stage(label), tags=_method_tags(label, episodes.test)):
            try:
                outcome = evaluate_method(method, context, features, subsets, episodes, config)
            except FewshotMedError:
                raise
            except Exception as error:
                failure = error
                raise
            _log_method(label, *outcome[:2], config.evaluation, outcome[2])
    except Exception as error:
        if error is not failure:
            raise
        first_line = (str(error).splitlines() or [""])[0]
        return tracking.redact_text(f"{type(error).__name__}: {first_line}")
    return outcome


def _method_tags(label: str, shots: Iterable[int]) -> dict[str, str]:
    """The tags of a method's nested run: its label and its Ks."""
    return {names.METHOD_TAG: label, names.SHOTS_TAG: names.list_value(sorted(set(shots)))}


def evaluate_method(
    method: MethodConfig,
    context: MethodContext,
    features: dict[str, torch.Tensor],
    subsets: dict[str, ClassSubset],
    episodes: Episodes,
    config: Config,
) -> tuple[list[EpisodeResults], list[EpisodeResults], dict[tuple[str, int], EpisodeResults]]:
    """One method over every K: few-shot results with their calibrated variants, generalised results
    (frozen-feature methods), and the val-episode results (when val episodes are drawn)."""
    label = method.display_name
    create_method(method.name, context, **method.params)  # refuse bad names/params before any work
    settings = config.evaluation
    scoring: dict[str, Any] = {"label": label, "coverage": settings.coverage, "n_bins": settings.ece_bins}
    method_class = METHODS[method.name]
    frozen = method_class.inputs == "features"
    spec, device = context.spec, context.device
    to_input = lambda images: to_model_input(images, spec.mean, spec.std, spec.in_chans, device)  # noqa: E731
    test_pool, val_pool = subsets["novel_test"], subsets["novel_val"]
    results, generalised, validation = [], [], {}
    for k, all_test in episodes.test.items():
        test_episodes = _prefix(all_test, method.max_episodes)
        val_episodes = None if episodes.val is None else _prefix(episodes.val[k], method.max_episodes)
        val, chosen, tried = None, {}, ()
        if method.search:
            chosen, val, tried = search_on_val(
                method, context, features["novel_val"], val_pool, val_episodes, scoring
            )
        factory = partial(create_method, method.name, context, **method.params, **chosen)
        if frozen:
            leave_one_out = (
                "loo_temperature" in settings.calibration and k >= 2 and not method_class.transductive
            )
            test = evaluate_frozen(
                factory,
                features["novel_test"],
                test_pool,
                test_episodes,
                leave_one_out=leave_one_out,
                **scoring,
            )
            test.params, test.search_scores = chosen, tried
            if val_episodes is not None and val is None:
                val = evaluate_frozen(factory, features["novel_val"], val_pool, val_episodes, **scoring)
        else:
            test = evaluate_images(factory, test_pool.images, test_pool, test_episodes, to_input, **scoring)
            if val_episodes is not None:
                val = evaluate_images(factory, val_pool.images, val_pool, val_episodes, to_input, **scoring)
        results += [test, *calibrated_variants(test, val, settings)]
        if val is not None:
            validation[label, k] = val
        if settings.generalised and frozen:
            generalised.append(
                evaluate_generalised(
                    factory,
                    features["base_train"],
                    subsets["base_train"].labels,
                    features["base_test"],
                    subsets["base_test"].labels,
                    features["novel_test"],
                    test_pool,
                    test_episodes,
                    base_shots=settings.generalised_base_shots or k,
                    n_episodes=settings.generalised_episodes,
                    seed=config.seed,
                    label=label,
                    base_class_names=subsets["base_train"].class_names,
                )
            )
    return results, generalised, validation


def search_on_val(
    method: MethodConfig,
    context: MethodContext,
    features: torch.Tensor,
    pool: ClassSubset,
    episodes: EpisodeList | None,
    scoring: dict[str, Any],
) -> tuple[dict[str, Any], EpisodeResults, tuple[tuple[dict[str, Any], float], ...]]:
    """Every combination of ``method.search`` on the val episodes: the most accurate one (the first
    on ties; combinations that fail on some episode are never chosen while another did not), its val
    results, and each combination with its mean val accuracy (NaN when it failed).

    Args:
        method: a frozen-feature method with a non-empty ``search``.
        context: the methods' context.
        features: ``(len(pool), D)`` embeddings of the val pool.
        pool: the novel-class val images the episodes come from.
        episodes: the val episodes of one K (``None`` is refused: config validation requires them).
        scoring: ``evaluate_frozen``'s keyword arguments (label, coverage, bins).
    """
    if episodes is None:
        raise ValueError(f"{method.display_name}: a search needs val episodes")
    outcomes = []
    for combination in search_combinations(method.search):
        factory = partial(create_method, method.name, context, **method.params, **combination)
        result = evaluate_frozen(factory, features, pool, episodes, **scoring)
        accuracy = result.summary()["accuracy"][0] if result.n_failed == 0 else float("nan")
        outcomes.append((combination, accuracy, result))
    finite = [outcome for outcome in outcomes if np.isfinite(outcome[1])] or outcomes[:1]
    chosen, _, val = max(finite, key=lambda outcome: outcome[1])  # max keeps the first of equals
    tried = [(combination, accuracy) for combination, accuracy, _ in outcomes]
    return chosen, val, tuple(tried)


def evaluate_oracle_rows(
    features: dict[str, torch.Tensor],
    subsets: dict[str, ClassSubset],
    episodes: Episodes,
    settings: EvaluationConfig,
) -> list[EpisodeResults]:
    """The oracle probe on every K's test episodes (its queries), calibrated on the val episodes."""
    scoring: dict[str, Any] = {"coverage": settings.coverage, "n_bins": settings.ece_bins}
    train, labels = features["novel_train"], subsets["novel_train"].labels
    results = []
    for k, test_episodes in episodes.test.items():
        test = evaluate_oracle(
            train, labels, features["novel_test"], subsets["novel_test"], test_episodes, **scoring
        )
        val = None
        if episodes.val is not None:
            val = evaluate_oracle(
                train, labels, features["novel_val"], subsets["novel_val"], episodes.val[k], **scoring
            )
        results += [test, *calibrated_variants(test, val, settings)]
    return results


def _evaluation_params(config: Config) -> dict[str, Any]:
    settings = config.evaluation.model_dump()
    settings[names.CALIBRATION_PARAM] = names.list_value(settings["calibration"])
    return {**settings, names.EPISODES_SECTION: config.episodes.model_dump()}


def _summary_metrics(
    result: EpisodeResults, method: str | None, generalised: bool = False
) -> dict[str, float]:
    """``result``'s summary under its ``names.test_metric`` (``generalised_metric``) keys; ``method``
    ``None`` on the method's own run."""
    if generalised:
        key = partial(names.generalised_metric, result.k_shot, method)
    else:
        key = partial(names.test_metric, result.k_shot, method, result.calibration)
    return tracking.summary_metrics(result.summary(), key)


def _per_episode_csv(result: EpisodeResults) -> str:
    """Per-episode metric values as CSV text."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["episode", *result.metrics])
    for index, row in enumerate(zip(*result.metrics.values(), strict=True)):
        writer.writerow([index, *(float(value) for value in row)])
    return buffer.getvalue()


def _log_method(
    label: str,
    results: list[EpisodeResults],
    generalised: list[EpisodeResults],
    settings: EvaluationConfig,
    validation: dict[tuple[str, int], EpisodeResults] | None = None,
) -> None:
    """On the method's nested run (the current one): metrics (val-episode summaries by test K
    included), calibrator parameters, the hyperparameters its search chose with every combination's
    val accuracy, per-episode CSVs and plots; its summaries also go on the pipeline run under the
    method's name."""
    val_results = {k: result for (_, k), result in (validation or {}).items()}
    searched = [result for result in results if result.calibration == names.UNCALIBRATED and result.params]
    pipeline_run = tracking.pipeline_run_id()
    for k, val in val_results.items():
        tracking.log_metrics(tracking.summary_metrics(val.summary(), partial(names.val_metric, k)))
    for result in searched:
        tracking.log_params({names.search_param(result.k_shot, p): v for p, v in result.params.items()})
        tracking.log_text_artifact(_search_csv(result), names.search_path(result.k_shot))
    for result in results:
        tracking.log_metrics(_summary_metrics(result, None))
        fitted = {
            names.calibration_metric(result.k_shot, result.calibration, param): value
            for param, value in result.calibrator.items()
        }
        tracking.log_metrics(fitted)
        path = names.per_episode_path(result.k_shot, result.calibration)
        tracking.log_text_artifact(_per_episode_csv(result), path)
    for result in generalised:
        tracking.log_metrics(_summary_metrics(result, None, generalised=True))
    if settings.plots:
        _log_method_plots(label, results, generalised, settings.ece_bins)
    for result in results:
        tracking.log_metrics(_summary_metrics(result, label), run_id=pipeline_run)
    for k, val in val_results.items():
        key = lambda metric, k=k: names.val_metric(k, metric, label)  # noqa: E731
        tracking.log_metrics(tracking.summary_metrics(val.summary(), key), run_id=pipeline_run)
    for result in searched:
        params = {names.search_param(result.k_shot, p, label): v for p, v in result.params.items()}
        tracking.log_params(params, run_id=pipeline_run)
    for result in generalised:
        tracking.log_metrics(_summary_metrics(result, label, generalised=True), run_id=pipeline_run)


def _search_csv(result: EpisodeResults) -> str:
    """Every combination a search tried at one K, with its mean val-episode accuracy, as CSV."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    names_ = list(result.params)
    writer.writerow([*names_, "val_accuracy", "chosen"])
    for combination, accuracy in result.search_scores:
        writer.writerow([*(combination[n] for n in names_), accuracy, combination == result.params])
    return buffer.getvalue()


def _log_method_plots(
    label: str, results: list[EpisodeResults], generalised: list[EpisodeResults], n_bins: int
) -> None:
    """Per K: a reliability diagram (before and after the val-episode temperature, else the first
    calibrator) and a confusion matrix over the novel classes; the generalised confusion matrix."""
    from fewshot_med.evaluation.plots import confusion_matrix_figure, reliability_diagram

    for k in sorted({result.k_shot for result in results}):
        at_k = {result.calibration: result for result in results if result.k_shot == k}
        raw = at_k["none"]
        calibrated = at_k.get("val_temperature") or next((r for r in at_k.values() if r is not raw), None)
        n_classes = raw.logits.shape[-1]
        title = f"{label}, {k}-shot" + (f" ({calibrated.calibration} on the right)" if calibrated else "")
        figure = reliability_diagram(
            raw.probs.reshape(-1, n_classes),
            raw.labels.ravel(),
            calibrated_probs=None if calibrated is None else calibrated.probs.reshape(-1, n_classes),
            n_bins=n_bins,
            title=title,
        )
        tracking.log_figure(figure, names.plot_path(names.RELIABILITY, k))
        true, predicted = raw.pooled_class_labels()
        figure = confusion_matrix_figure(
            true, predicted, raw.class_names, title=f"{label}, {k}-shot, test episodes"
        )
        tracking.log_figure(figure, names.plot_path(names.CONFUSION, k))
    for result in generalised:
        if result.class_names:
            true, predicted = result.pooled_class_labels()
            title = f"{label}, {result.k_shot}-shot, base + novel classes"
            figure = confusion_matrix_figure(true, predicted, result.class_names, title=title)
            tracking.log_figure(figure, names.plot_path(names.GENERALISED_CONFUSION, result.k_shot))


def _log_report(report: EvaluationReport, settings: EvaluationConfig) -> None:
    """The summary tables (markdown, CSV, JSON) and the cross-method plots, on the evaluate run."""
    table, table_csv = report.table(), summary_csv(report.few_shot + report.generalised)
    pipeline_run = tracking.pipeline_run_id()
    for run_id in (None, pipeline_run):  # the evaluate run, then the pipeline run
        tracking.log_text_artifact(table, names.RESULTS_MD, run_id=run_id)
        tracking.log_text_artifact(table_csv, names.RESULTS_CSV, run_id=run_id)
    tracking.log_dict_artifact(summary_rows(report.few_shot + report.generalised), names.RESULTS_JSON)
    if not settings.plots:
        return
    from fewshot_med.evaluation.plots import accuracy_vs_shots_figure, risk_coverage_figure

    raw = [result for result in report.few_shot if result.calibration == "none"]
    rows = [(r.method, r.k_shot, *r.summary()["accuracy"]) for r in raw]
    figure = accuracy_vs_shots_figure(rows, title="Test accuracy (mean ± 95% CI over episodes)")
    tracking.log_figure(figure, names.plot_path(names.ACCURACY_VS_SHOTS), run_id=pipeline_run)
    for k in sorted({result.k_shot for result in raw}):
        curves = {}
        for result in (r for r in raw if r.k_shot == k):
            coverage, risk = risk_coverage_curve(result.probs, result.labels)
            curves[result.method] = (coverage, risk.mean(axis=0))
        title = f"{k}-shot: risk of the most confident queries (mean over episodes)"
        path = names.plot_path(names.RISK_COVERAGE, k)
        tracking.log_figure(risk_coverage_figure(curves, title=title), path, run_id=pipeline_run)
