"""The robustness stage: white-box attacks on the adapted few-shot methods of an earlier run's backbone.

    CONFIG, --from RUN  ->  backbone  ->  embed once  ->  the run's test episodes (checked against
    its saved lists)  ->  per attackable method and K: clean vs PGD / FGSM accuracy and pooled ECE,
    the support-set attack, the gradient-masking check  ->  one ``robustness`` stage run

Hyperparameters a method searches are chosen on the val episodes, as the evaluate stage does.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from functools import partial

from fewshot_med import tracking
from fewshot_med.config import Config
from fewshot_med.methods import create_method
from fewshot_med.pipelines.episodes import Episodes, check_saved_episodes, draw_episodes
from fewshot_med.pipelines.evaluation import Embedded, embed_subsets, search_on_val
from fewshot_med.pipelines.stages import StageContext, open_context
from fewshot_med.pipelines.transfer import backbone_stages
from fewshot_med.progress import Progress
from fewshot_med.robustness.adapted import ATTACKABLE, SUPPORT_ATTACKABLE, FeatureModel, unit_images
from fewshot_med.robustness.evaluate import (
    CLEAN,
    RobustnessSettings,
    attack_queries,
    attack_support,
    epsilon_label,
    masking_check,
)
from fewshot_med.robustness.report import RobustnessReport
from fewshot_med.tracking import names

#: Why a method of the config is not attacked, by kind.
NOT_COVERED = {
    "images": "fine-tuning: each attack step would back-propagate through every fine-tuning step",
    "transductive": "transductive: its logits depend on the whole query set, to be perturbed jointly",
    "features": "its prediction is not a differentiable function of the features",
}


def robustness_study(
    context: StageContext, embedded: Embedded, episodes: Episodes, settings: RobustnessSettings
) -> RobustnessReport:
    """Attack every attackable method of ``context.config`` on the first ``settings.episodes`` test
    episodes of each K; see ``fewshot_med.robustness.evaluate``."""
    from fewshot_med.methods import METHODS

    config = context.config
    backbone, spec = context.trained()
    device = context.device
    model_features = FeatureModel(backbone, spec).to(device)
    pool = embedded.pools["test"]
    images = unit_images(pool.images, device)
    features = embedded.features["novel_test"].to(device)
    report = RobustnessReport(settings)
    attackable = []
    for method in config.methods:
        cls = METHODS[method.name]
        if method.name in ATTACKABLE:
            attackable.append(method)
        else:
            kind = "images" if cls.inputs == "images" else "transductive" if cls.transductive else "features"
            report.not_covered[method.display_name] = NOT_COVERED[kind]
    scoring = {"coverage": config.evaluation.coverage, "n_bins": config.evaluation.ece_bins}
    total = len(attackable) * len(episodes.test)
    done = 0
    with Progress("robustness", total=total, unit="method x K") as progress:
        for method in attackable:
            for k, test_episodes in episodes.test.items():
                chosen = {}
                if method.search and episodes.val is not None:
                    val_features, val_pool = embedded.features["novel_val"], embedded.pools["val"]
                    chosen, _, _ = search_on_val(
                        method, embedded.methods, val_features, val_pool, episodes.val[k],
                        {"label": method.display_name, **scoring},
                    )  # fmt: skip
                factory = partial(create_method, method.name, embedded.methods, **method.params, **chosen)
                label = method.display_name
                args = (factory, label, model_features, images, features, pool, test_episodes, settings)
                results = attack_queries(*args)
                report.queries += results
                report.checks.append(masking_check(results, settings))
                if method.name in SUPPORT_ATTACKABLE and settings.support_targets > 0:
                    report.support += attack_support(*args)
                done += 1
                progress.update(done, force=True)
    return report


def robustness_stage(
    context: StageContext, settings: RobustnessSettings, from_run: str | None = None
) -> RobustnessReport:
    """The study under a ``robustness`` stage run: settings as params, the episode lists, tables and
    metrics. Test episodes are checked against those ``from_run`` saved."""
    config = context.config
    embedded = embed_subsets(context)
    episodes = draw_episodes(config, embedded.pools, context.n_way)
    params = {f"{names.ROBUSTNESS}.{key}": value for key, value in _settings_params(settings).items()}
    with tracking.stage_run(names.ROBUSTNESS, params=params):
        if from_run is not None:
            check_saved_episodes(episodes, from_run, config)
        tracking.log_dataset_input(context.data.dataset, "evaluation", "test", context.data.roles.novel)
        for k, test_episodes in episodes.test.items():
            tracking.log_dict_artifact(test_episodes.to_dict(), names.episodes_path("test", k))
        start = time.perf_counter()
        report = robustness_study(context, embedded, episodes, settings)
        tracking.log_metrics(
            {**robustness_metrics(report), names.time_metric(names.ROBUSTNESS): time.perf_counter() - start}
        )
        tracking.log_text_artifact(report.markdown(), names.ROBUSTNESS_MD)
        tracking.log_text_artifact(report.csv(), names.ROBUSTNESS_CSV)
    return report


def robustness_metrics(report: RobustnessReport) -> dict[str, float]:
    """``robust.<K>shot.<method>.<attack>.<metric>[_ci95]``, ``support_attack.…``, ``masking_check.…``."""
    metrics: dict[str, float] = {}
    for r in report.queries:
        attack = CLEAN if r.attack is None else r.attack.key
        for metric, (value, half) in r.summary().items():
            metrics[names.robust_metric(r.k_shot, r.method, attack, metric)] = value
            metrics[names.robust_metric(r.k_shot, r.method, attack, names.ci95(metric))] = half
    for s in report.support:
        mean, half = s.summary()
        eps = epsilon_label(s.epsilon).split("/")[0]
        metrics[names.support_attack_metric(s.k_shot, s.method, eps, "success_rate")] = mean
        metrics[names.support_attack_metric(s.k_shot, s.method, eps, names.ci95("success_rate"))] = half
    for c in report.checks:
        metrics[names.masking_check_metric(c.k_shot, c.method)] = float(c.passed)
    return metrics


@dataclass
class RobustnessOutcome:
    """What ``fewshot-med robustness`` produced: the MLflow pipeline run id and the report."""

    run_id: str | None
    report: RobustnessReport


def run_robustness(config: Config, from_run: str, settings: RobustnessSettings) -> RobustnessOutcome:
    """``fewshot-med robustness CONFIG --from RUN``: one pipeline run holding the ``robustness`` stage."""
    context = open_context(config)
    settings = dataclasses.replace(settings, seed=config.seed)
    tags = {names.STAGES_TAG: names.ROBUSTNESS, names.FROM_RUN_TAG: from_run}
    with tracking.pipeline_run(config, run_name=config.name, tags=tags) as run:
        context = backbone_stages(context, (), from_run)
        report = robustness_stage(context, settings, from_run)
    return RobustnessOutcome(run.run_id, report)


def _settings_params(settings: RobustnessSettings) -> dict[str, object]:
    """The settings as MLflow params (budgets in 255ths)."""
    values = dataclasses.asdict(settings)
    values["epsilons"] = names.list_value(round(e * 255) for e in settings.epsilons)
    values["steps"] = names.list_value(settings.steps)
    values["check_epsilon"] = round(settings.check_epsilon * 255)
    return values
