"""The Bayesian-transfer suite (issue 6), on HAM10000 and PBC novel classes.

Per dataset, one backbone pretrained with a SWAG posterior over its last epochs (the dataset's
``*_bayes.yaml`` config, trained here or reused with ``--from``) embeds every image once; then, on the
saved test episodes for K ∈ {1, 5, 10}:

1. **Priors.** Last-block fine-tuning plain, under L2-SP, under the informative SWAG prior of
   pretraining (MAP), and the same with Bayesian model averaging over a downstream SWAG posterior,
   beside frozen-feature methods (SimpleShot, logistic regression, and the Laplace Bayesian linear
   head with its candidates chosen by the CLML), each as the evaluate stage runs it (val-episode
   temperature). The SWAG prior's covariance scale is chosen on 5-shot val episodes. Rows report
   accuracy, pooled ECE and NLL with 95% CIs, and the paired differences in accuracy and per-episode
   ECE against plain fine-tuning on the same episodes (fine-tuning runs on the first N episodes).
2. **Selection.** The study of ``fewshot-med select``: every candidate of the config's ``selection``
   grid scored by CLML, LML, leave-one-out and training loss on the test episodes' support sets, each
   criterion's rank correlation with the test accuracy, and the accuracy of its choice against the
   best candidate in hindsight.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import (
    Lineage,
    SuiteOptions,
    SuiteReport,
    open_dataset,
    paired_on_common_episodes,
)
from fewshot_med import tracking
from fewshot_med.config import Config, MethodConfig
from fewshot_med.data.transforms import to_model_input
from fewshot_med.errors import FewshotMedError
from fewshot_med.evaluation import EpisodeResults, evaluate_images
from fewshot_med.methods import MethodContext, create_method
from fewshot_med.pipelines.episodes import Episodes
from fewshot_med.pipelines.evaluation import evaluate_method
from fewshot_med.pipelines.selection import SelectionResult, selection_studies
from fewshot_med.priors import SwagPosterior
from fewshot_med.tracking import names

REPO = Path(__file__).resolve().parents[2]
#: The suite's name (its MLflow runs and artifacts, ``fewshot_med.tracking.names``).
SUITE = "bayes"
#: Dataset name -> the config of its Bayesian-transfer pipeline (SWAG pretraining, methods, selection grid).
DATASETS = {"ham10000": REPO / "configs/ham10000_bayes.yaml", "pbc": REPO / "configs/pbc_bayes.yaml"}
#: The row every other row is compared with (a method label of the configs).
REFERENCE = "finetune"
#: Covariance scales of the SWAG prior tried on val episodes (Shwartz-Ziv et al. search 1e0 … 1e10).
PRIOR_SCALES = (1.0, 1e2, 1e4, 1e6)
#: Val episodes (the first of the 5-shot list) on which the prior scale is chosen.
SCALE_EPISODES = 30
SCALE_SHOTS = 5
#: A smoke run: minutes on 2 cores; its numbers mean nothing.
QUICK_OVERRIDES = (
    "pretrain.epochs=2",
    "pretrain.steps_per_epoch=3",
    "pretrain.warmup_epochs=0",
    "pretrain.swag.start_epoch=1",
    "pretrain.swag.snapshots_per_epoch=2",
    "episodes.shots=[1, 5]",
    "episodes.n_test_episodes=6",
    "episodes.n_val_episodes=4",
    "selection.prior_precision=[0.1, 10]",
    "selection.orderings=2",
)
QUICK_SCALES = (1.0, 1e4)
QUICK_SCALE_EPISODES = 2
QUICK_STEPS = 3
QUICK_MAX_EPISODES = 3


@dataclass
class DatasetStudy(Lineage):
    """Everything measured on one dataset, with its lineage (``swag``: the prior, described)."""

    swag: str = ""
    scale_accuracy: dict[float, float] = field(default_factory=dict)
    prior_scale: float = 1.0
    results: list[EpisodeResults] = field(default_factory=list)
    selection: list[SelectionResult] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


def run(options: SuiteOptions) -> SuiteReport:
    """The suite on every dataset of ``DATASETS``: tables, headline metrics and record."""
    if options.threads:
        torch.set_num_threads(options.threads)
    studies = [study_dataset(name, options) for name in DATASETS]
    report = SuiteReport(markdown=_suite_markdown(studies, options.quick))
    for study in studies:
        report.record.update(_record(study))
        report.metrics.update(_headline_metrics(study))
        report.tables[names.dataset_artifact(SUITE, study.name, "md")] = _dataset_markdown(study)
        for result in study.selection:
            table = names.dataset_artifact("selection", study.name, "csv", result.k_shot)
            report.tables[table] = result.scores_csv()
    return report


def study_dataset(name: str, options: SuiteOptions) -> DatasetStudy:
    """Backbone and prior, the prior comparison and the selection study on one dataset, under an MLflow
    run ``bayes:<name>`` nested in the suite's run."""
    configure = _quick_methods if options.quick else None
    with open_dataset(SUITE, name, DATASETS[name], options, QUICK_OVERRIDES, configure) as opened:
        swag = opened.context.swag
        if swag is None:
            raise FewshotMedError(
                f"the {name} backbone has no SWAG posterior: pass --from a run of {DATASETS[name].name} "
                "(pretrain.swag.enabled: true), or no --from to pretrain one"
            )
        embedded, episodes = opened.embedded, opened.episodes
        subsets, features, context = embedded.subsets, embedded.features, embedded.methods
        study = DatasetStudy(**opened.lineage.lineage(), swag=_describe(swag))
        _choose_prior_scale(study, context, subsets, episodes, options.quick)
        for method in study.config.methods:
            method = _with_scale(method, study.prior_scale)
            start = time.perf_counter()
            results, _, _ = evaluate_method(method, context, features, subsets, episodes, study.config)
            study.seconds[method.display_name] = time.perf_counter() - start
            study.results += results
        start = time.perf_counter()
        study.selection = selection_studies(
            study.config,
            features["novel_test"],
            subsets["novel_test"],
            episodes.test,
            context.base_feature_mean,
        )
        study.seconds["selection study"] = time.perf_counter() - start
        tracking.log_text_artifact(_dataset_markdown(study), names.suite_artifact(SUITE, "md"))
        tracking.log_metrics(_headline_metrics(study))
    return study


def _quick_methods(config: Config) -> Config:
    """A quick run's config: its fine-tunings take a few steps on a few episodes."""
    return config.model_copy(update={"methods": [_quick(method) for method in config.methods]})


def _quick(method: MethodConfig) -> MethodConfig:
    """A quick run's version of a method: a few fine-tuning steps on a few episodes."""
    if method.name != "finetune":
        return method
    params = {**method.params, "steps": QUICK_STEPS}
    if params.get("bma_samples"):
        params |= {"bma_samples": 2, "bma_snapshots": 2}
    return method.model_copy(update={"params": params, "max_episodes": QUICK_MAX_EPISODES})


def _with_scale(method: MethodConfig, scale: float) -> MethodConfig:
    """``method`` with the chosen SWAG prior scale, if it fine-tunes under the SWAG prior."""
    if method.params.get("prior") != "swag":
        return method
    return method.model_copy(update={"params": {**method.params, "prior_scale": scale}})


def _choose_prior_scale(
    study: DatasetStudy, context: MethodContext, subsets: dict, episodes: Episodes, quick: bool
) -> None:
    """The SWAG prior's scale with the best accuracy on the first val episodes of ``SCALE_SHOTS``
    shots (ties: the smaller scale), fine-tuning as the config's first SWAG-prior method does."""
    template = next((m for m in study.config.methods if m.params.get("prior") == "swag"), None)
    if template is None or episodes.val is None:
        return
    shots = min(episodes.val, key=lambda k: abs(k - SCALE_SHOTS))
    val = episodes.val[shots]
    count = QUICK_SCALE_EPISODES if quick else SCALE_EPISODES
    val = dataclasses.replace(val, episodes=val.episodes[:count])
    pool, spec = subsets["novel_val"], context.spec
    start = time.perf_counter()
    params = {key: value for key, value in template.params.items() if not key.startswith("bma_")}
    for scale in QUICK_SCALES if quick else PRIOR_SCALES:
        result = evaluate_images(
            lambda scale=scale: create_method("finetune", context, **{**params, "prior_scale": scale}),
            pool.images,
            pool,
            val,
            lambda images: to_model_input(images, spec.mean, spec.std, spec.in_chans, context.device),
            label=f"swag prior scale {scale:g}",
        )
        study.scale_accuracy[scale] = result.summary()["accuracy"][0]
    study.prior_scale = max(study.scale_accuracy, key=lambda s: (study.scale_accuracy[s], -s))
    study.seconds["choosing the prior scale"] = time.perf_counter() - start


def _describe(swag: SwagPosterior) -> str:
    return (
        f"SWAG over {swag.n_snapshots} snapshots, rank {swag.rank}, "
        f"{swag.mean.numel() / 1e6:.2f} M parameters"
    )


def _result(study: DatasetStudy, label: str, k: int, calibration: str = "none") -> EpisodeResults | None:
    return next(
        (r for r in study.results if r.method == label and r.k_shot == k and r.calibration == calibration),
        None,
    )


def _cell(value: tuple[float, float], scale: float = 100.0, digits: int = 1, signed: bool = False) -> str:
    mean, half = value
    if not np.isfinite(mean):
        return "NaN"
    sign = "+" if signed else ""
    return f"{scale * mean:{sign}.{digits}f} ± {scale * half:.{digits}f}"


def _labels(study: DatasetStudy) -> list[str]:
    return list(dict.fromkeys(method.display_name for method in study.config.methods))


def _prior_table(study: DatasetStudy, k: int) -> list[str]:
    reference = _result(study, REFERENCE, k)
    reference_calibrated = _result(study, REFERENCE, k, "val_temperature")
    lines = [
        f"K = {k}:",
        "",
        "| method | episodes | accuracy | ECE (pooled) | ECE, val temperature | NLL, val temperature | "
        f"Δ accuracy vs {REFERENCE} | Δ ECE vs {REFERENCE} (per episode, val temperature) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label in _labels(study):
        raw, calibrated = _result(study, label, k), _result(study, label, k, "val_temperature")
        if raw is None:
            continue
        summary = raw.summary()
        scaled = (calibrated or raw).summary()
        delta = (
            _cell(paired_on_common_episodes(raw, reference, "accuracy"), signed=True)
            if reference and label != REFERENCE
            else "—"
        )
        delta_ece = "—"
        if reference_calibrated is not None and calibrated is not None and label != REFERENCE:
            delta_ece = _cell(
                paired_on_common_episodes(calibrated, reference_calibrated, "ece"),
                scale=1.0,
                digits=3,
                signed=True,
            )
        lines.append(
            f"| {label} | {len(raw)} | {_cell(summary['accuracy'])} | "
            f"{_cell(summary['ece_pooled'], 1.0, 3)} | {_cell(scaled['ece_pooled'], 1.0, 3)} | "
            f"{_cell(scaled['nll'], 1.0, 3)} | {delta} | {delta_ece} |"
        )
    return lines


def _verdicts(study: DatasetStudy) -> list[str]:
    """One sentence per K and prior: does it beat plain fine-tuning, with a CI that excludes zero?"""
    lines = []
    for k in sorted({r.k_shot for r in study.results}):
        reference = _result(study, REFERENCE, k)
        reference_calibrated = _result(study, REFERENCE, k, "val_temperature")
        for label in _labels(study):
            if not label.startswith(f"{REFERENCE}_") or reference is None:
                continue
            raw, calibrated = _result(study, label, k), _result(study, label, k, "val_temperature")
            accuracy = paired_on_common_episodes(raw, reference, "accuracy")
            parts = [f"accuracy {_cell(accuracy, signed=True)} points ({_significance(accuracy)})"]
            if calibrated is not None and reference_calibrated is not None:
                error = paired_on_common_episodes(calibrated, reference_calibrated, "ece")
                parts.append(f"ECE {_cell(error, 1.0, 3, signed=True)} ({_significance(error)})")
            lines.append(f"- K = {k}, {label} minus {REFERENCE}: " + "; ".join(parts) + ".")
    return lines


def _significance(value: tuple[float, float]) -> str:
    mean, half = value
    return "CI excludes 0" if np.isfinite(mean) and abs(mean) > half else "CI includes 0"


def _selection_summary(studies: list[DatasetStudy]) -> list[str]:
    criteria = list(studies[0].selection[0].scores) if studies and studies[0].selection else []
    settings = [(study.name, result) for study in studies for result in study.selection]
    lines = [
        f"Over the {len(settings)} settings (dataset, K), choosing once per dataset by the mean score:",
        "",
        "| criterion | choice within 1 point of the best in hindsight | mean Spearman with accuracy "
        "| mean Spearman with test log-likelihood | mean gap to the best (points) |",
        "|---|---|---|---|---|",
    ]
    for index, name in enumerate(criteria):
        outcomes = [result.outcomes[index] for _, result in settings]
        within = sum(outcome.within_one_point for outcome in outcomes)
        lines.append(
            f"| {name} | {within} of {len(outcomes)} | "
            f"{np.mean([o.rank_correlation for o in outcomes]):.2f} | "
            f"{np.mean([o.log_likelihood_correlation for o in outcomes]):.2f} | "
            f"{np.mean([o.dataset_gap[0] for o in outcomes]):+.1f} |"
        )
    return lines


def _dataset_markdown(study: DatasetStudy) -> str:
    lines = [
        f"### {study.name}",
        "",
        f"Backbone {study.backbone_source}; prior: {study.swag}; data sha256 `{study.data_digest[:12]}`; "
        f"episodes {study.episode_source}.",
        "",
    ]
    if study.scale_accuracy:
        tried = ", ".join(f"{scale:g}: {100 * acc:.1f}" for scale, acc in study.scale_accuracy.items())
        lines += [
            f"SWAG prior scale chosen on val episodes (accuracy, %): {tried}; chosen {study.prior_scale:g}.",
            "",
        ]
    lines += ["#### Prior-regularised fine-tuning against plain fine-tuning and frozen features", ""]
    for k in sorted({r.k_shot for r in study.results}):
        lines += [*_prior_table(study, k), ""]
    lines += [*_verdicts(study), "", "#### Selection without a validation set", ""]
    for result in study.selection:
        lines += [result.table(), ""]
    lines += ["Wall time (s): " + ", ".join(f"{name} {sec:.0f}" for name, sec in study.seconds.items()), ""]
    return "\n".join(lines)


def _suite_markdown(studies: list[DatasetStudy], quick: bool) -> str:
    lines = ["## Bayesian transfer: informative priors and selection without validation data", ""]
    if quick:
        lines += ["**Quick mode: tiny training and few episodes; these numbers mean nothing.**", ""]
    lines += [
        "Each dataset's backbone is pretrained on the base classes with a SWAG posterior over its last "
        "epochs (`configs/*_bayes.yaml`, no meta-training). Accuracy and NLL are means over episodes with "
        "95% CIs; ECE (pooled) is the top-label ECE (15 bins) of all test queries with a bootstrap CI; "
        "Δ columns are paired differences on the same episodes (fine-tuning rows on the first N). "
        "Selection tables: mean criterion score per support point, and each candidate's test accuracy "
        "in hindsight (uncalibrated; the candidates are `laplace_logreg` configurations).",
        "",
        *_selection_summary(studies),
        "",
    ]
    for study in studies:
        lines += [_dataset_markdown(study), ""]
    return "\n".join(lines)


def _record(study: DatasetStudy) -> dict[str, str]:
    return {
        **study.record(),
        names.record_key(study.name, "prior"): study.swag,
        names.record_key(study.name, "prior_scale"): f"{study.prior_scale:g}",
    }


def _headline_metrics(study: DatasetStudy) -> dict[str, float]:
    metrics: dict[str, float] = {}
    for k in sorted({r.k_shot for r in study.results}):
        reference = _result(study, REFERENCE, k)
        for label in _labels(study):
            raw = _result(study, label, k)
            if raw is None or reference is None or label == REFERENCE:
                continue
            mean, half = paired_on_common_episodes(raw, reference, "accuracy")
            metrics[names.benchmark_metric(study.name, k, label, "delta_accuracy")] = mean
            metrics[names.benchmark_metric(study.name, k, label, names.ci95("delta_accuracy"))] = half
    for result in study.selection:
        for outcome in result.outcomes:
            key = partial(names.benchmark_metric, study.name, result.k_shot, names.SELECT, outcome.criterion)
            metrics[key("rank_correlation")] = outcome.rank_correlation
            metrics[key("dataset_gap")] = outcome.dataset_gap[0]
    return metrics
