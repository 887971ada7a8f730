"""The registration stage: adapt the best method to labelled cases and register it in MLflow.

Selection rule (stated in every registered version's description): among the evaluated inductive
methods (a method whose evaluation failed is not one), the one with the highest mean accuracy on the
val episodes at the registered shot count (the test episodes are never used to choose). Transductive
methods are not registered: a served classifier must give a file the same answer whatever other files
arrive with it. The classifier is that method (with the hyperparameters its search chose at K) fitted
on K images per novel class drawn from the train split (seeded), with the temperature fitted on the val
episodes, so the test-episode metrics of that method, K and calibration describe it.
"""

from __future__ import annotations

import numpy as np

from fewshot_med import tracking
from fewshot_med.config import Config
from fewshot_med.deploy import Preprocessing, fit_classifier
from fewshot_med.errors import ConfigError
from fewshot_med.evaluation import EpisodeResults
from fewshot_med.evaluation.report import markdown_table
from fewshot_med.methods import METHODS, create_method
from fewshot_med.pipelines.evaluation import EvaluationReport
from fewshot_med.pipelines.stages import Data, StageContext
from fewshot_med.tracking import Registration, names


def _selected(report: EvaluationReport, k_shot: int, inductive: set[str]) -> tuple[str, EpisodeResults]:
    """The method among ``inductive`` labels with the highest mean val-episode accuracy at test
    ``k_shot``, and those results."""
    at_k = {
        method: val for (method, k), val in report.validation.items() if k == k_shot and method in inductive
    }
    if not at_k:
        raise ConfigError(
            f"tracking.registered_model needs val-episode results of an inductive method at K={k_shot}: "
            "keep val_temperature in evaluation.calibration, K in episodes.shots (or set "
            "tracking.register_k_shot) and a method that is not transductive in methods"
        )
    method = max(at_k, key=lambda name: at_k[name].summary()["accuracy"][0])
    return method, at_k[method]


def register_stage(context: StageContext, report: EvaluationReport) -> Registration | None:
    """Select, adapt, log and register the classifier (nothing when no model name is configured); the
    method gets the same context as in the evaluation (base-class mean feature, SWAG posterior)."""
    config, data = context.config, context.data
    name = config.tracking.registered_model
    if name is None or not config.tracking.enabled:
        return None
    k_shot = config.tracking.register_k_shot or max(config.episodes.shots)
    inductive = {m.display_name for m in config.methods if not METHODS[m.name].transductive}
    inductive -= set(report.failed)  # a method whose evaluation raised is never registered
    label, chosen = _selected(report, k_shot, inductive)
    method_config = next(m for m in config.methods if m.display_name == label)
    test = {r.calibration: r for r in report.few_shot if r.method == label and r.k_shot == k_shot}
    calibrated = test.get("val_temperature", test["none"])
    temperature = calibrated.calibrator.get("temperature", 1.0)

    pool = data.subset("train", "novel")
    counts = np.bincount(pool.labels, minlength=len(pool.class_names))
    if counts.min() < k_shot:
        scarce = pool.class_names[int(counts.argmin())]
        raise ConfigError(
            f"tracking.registered_model: the train split holds {counts.min()} image(s) of '{scarce}', fewer "
            f"than the {k_shot} the classifier is fitted on; set tracking.register_k_shot lower"
        )
    rng = np.random.default_rng([config.seed, k_shot])
    rows = np.concatenate(
        [rng.choice(np.flatnonzero(pool.labels == c), k_shot, replace=False) for c in range(len(counts))]
    )
    backbone, spec = context.trained()
    methods_context = context.method_context(report.base_feature_mean)
    params = {**method_config.params, **test["none"].params}  # with what its search chose at K
    method = create_method(method_config.name, methods_context, **params)
    preprocessing = Preprocessing(  # the registered model reads files as the training data was read
        image_size=spec.image_size,
        channels=pool.images.shape[-1],
        intensity=config.data.intensity,
        nifti_slice=config.data.nifti_slice,
    )
    classifier = fit_classifier(
        backbone,
        spec,
        method,
        pool.images[rows],
        pool.labels[rows],
        pool.class_names,
        temperature,
        context.device,
        preprocessing=preprocessing,
    )
    score_name = names.val_metric(chosen.k_shot, "accuracy")
    score = chosen.summary()["accuracy"][0]
    description = _description(
        config, data, chosen, calibrated, test["none"], k_shot, temperature, score_name
    )
    with tracking.stage_run(names.REGISTER, tags={names.METHOD_TAG: label, names.K_SHOT_TAG: str(k_shot)}):
        tracking.log_text_artifact(description, names.MODEL_CARD)
        uri = tracking.log_classifier(classifier)
        registration = tracking.register_model(
            uri, name, description, score, score_name, alias=config.tracking.model_alias
        )
        tracking.set_tags(
            {
                names.REGISTERED_MODEL_TAG: name,
                names.REGISTERED_VERSION_TAG: registration.version,
                names.holds_alias_tag(registration.alias): str(registration.holds_alias).lower(),
            }
        )
    return registration


def _description(
    config: Config,
    data: Data,
    chosen: EpisodeResults,
    calibrated: EpisodeResults,
    uncalibrated: EpisodeResults,
    k_shot: int,
    temperature: float,
    score_name: str,
) -> str:
    """The version's model card: what it is, how it was chosen, and its test-episode evaluation."""
    classes = ", ".join(data.roles.novel)
    run_id = tracking.pipeline_run_id()
    accuracy, half_width = chosen.summary()["accuracy"]
    rows = [uncalibrated] if calibrated is uncalibrated else [uncalibrated, calibrated]
    return (
        f"**{chosen.method}** on a `{config.model.backbone}` backbone, adapted on {k_shot} labelled "
        f"images per class of the train split ({classes}; seed {config.seed}), temperature "
        f"{temperature:.3f} (fitted on val episodes).\n\n"
        f"Selection rule: highest mean accuracy of the inductive methods on {len(chosen)} val episodes "
        f"({score_name} = {accuracy:.3f} ± {half_width:.3f}); the alias `{config.tracking.model_alias}` "
        "moves to a new version that scores at least as well.\n\n"
        f"Test episodes ({config.episodes.n_query} queries per class at most), mean ± 95% CI:\n\n"
        f"{markdown_table(rows)}\n\n"
        f"Data `{tracking.logged_dataset_name(data.dataset)}`, digest `{data.dataset.digest}`; "
        f"pipeline run `{run_id}`; config `{config.name}`."
    )
