"""The adapt pipeline: a classifier for a hospital's own handful of labelled images, chosen and measured by
cross-validation, calibrated, with an abstention threshold, registered with a model card.

    DATA, --from  ->  backbone (a pipeline run's, or a registered classifier's)
         ->  every local image (no split)  ->  checks and audit  ->  embed once
         ->  cross-validate every candidate (method x hyperparameters) on the cached features
         ->  choose  ->  temperature on the out-of-fold logits  ->  metrics with 95% CIs
         ->  abstention threshold on the out-of-fold risk-coverage curve
         ->  refit on every image  ->  one MLflow ``adapt`` run, model card, model registry

Choice rule (``--choose-by``): ``logloss`` (default) picks the candidate whose out-of-fold predictions
have the lowest log-loss once a temperature is fitted to them: log-loss is a strictly proper score,
uses every image's confidence (which abstention relies on) and does not tie the way accuracy does on
twenty images (steps of 1/20); the temperature first puts methods with arbitrary logit scales
(SimpleShot's 0.1, R2-D2's 10) on an equal footing. ``accuracy`` picks the highest out-of-fold
accuracy, log-loss breaking ties. ``clml`` fits one candidate, the Bayesian logistic head
(``laplace_logreg``), which chooses its feature transform and prior precision inside every fit by the
conditional marginal likelihood of its training images (Lotfi et al., ICML 2022), so the
cross-validated metrics measure the whole choose-then-fit procedure. Under ``logloss`` and
``accuracy`` they are those of the winning candidate on the folds that chose it: slightly optimistic
when many candidates are close.

Only frozen-feature, inductive methods are candidates: a served classifier must give a file the same
answer whatever other files arrive with it, and fine-tuning per fold would cost minutes per candidate.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor, nn

from fewshot_med import tracking
from fewshot_med.audit import AuditSettings, audit_dataset
from fewshot_med.config import SelectionConfig, TrackingConfig, search_combinations
from fewshot_med.data import MedicalImageDataset
from fewshot_med.data.dataset import SPLITS
from fewshot_med.data.intensity import IntensityConfig
from fewshot_med.data.local import read_image_folder, read_manifest
from fewshot_med.deploy.classifier import FewShotClassifier, fit_classifier
from fewshot_med.deploy.model_card import build_card, card_markdown
from fewshot_med.deploy.preprocess import Preprocessing
from fewshot_med.errors import ConfigError, DataError, not_one_of
from fewshot_med.evaluation.calibration import TemperatureScaling
from fewshot_med.evaluation.cross_validation import (
    CV_METRICS,
    Estimate,
    Folds,
    abstention_threshold,
    calibrated_probs,
    confusion_counts,
    cross_fitted_temperatures,
    cv_metrics,
    make_folds,
    out_of_fold_logits,
)
from fewshot_med.evaluation.metrics import softmax
from fewshot_med.methods import METHODS, MethodContext, create_method
from fewshot_med.models import BackboneSpec, embed
from fewshot_med.privacy import redact_path
from fewshot_med.runtime import resolve_device, seed_everything
from fewshot_med.tracking import Registration, names
from fewshot_med.tracking.models import load_classifier

#: Candidate methods when ``--methods`` is not given.
DEFAULT_METHODS = ("simpleshot", "logreg", "r2d2")
#: The hyperparameters cross-validation chooses among, per method (the configs' val-episode searches,
#: plus R2-D2's ridge penalty); a method not listed runs with its defaults.
SEARCH_GRIDS: dict[str, dict[str, list[Any]]] = {
    "logreg": {"features": ["l2", "raw", "centred", "power"]},
    "r2d2": {"features": ["l2", "centred", "power"], "lam": [0.1, 1.0, 10.0]},
}
#: Temperature bounds (those of the evaluation's calibrators).
TEMPERATURE_BOUNDS = (0.05, 100.0)
#: ECE bins, as everywhere in the toolkit.
ECE_BINS = 15
#: Registered model name when ``--name`` is not given (a data folder's name may hold a name or a ward).
DEFAULT_NAME = "adapted-classifier"


@dataclass(frozen=True)
class AdaptSettings:
    """What ``fewshot-med adapt`` was asked to do (see ``docs/adapt.md``).

    Attributes:
        data: a folder of class subfolders, or a CSV manifest ``path,label[,patient_id][,split]``.
        source: a pipeline run id, or a classifier's model URI (``models:/NAME@ALIAS``, ``runs:/…``).
        name: registered model name.
        alias: the alias the new version should take (``register_model``'s rule).
        methods: candidate methods (frozen-feature, inductive), each with its ``SEARCH_GRIDS`` entry.
        folds: folds asked for (capped by the data, see ``make_folds``).
        repeats: repeats with reshuffled folds.
        choose_by: ``logloss``, ``accuracy`` or ``clml`` (see the module docstring).
        target_coverage: keep this fraction of images, abstain on the rest (exclusive with the next).
        target_accuracy: the largest coverage whose selective accuracy reaches this.
        seed: folds, bootstrap and method seeds.
        experiment: MLflow experiment.
        tracking_uri: the store; ``$MLFLOW_TRACKING_URI``, else ``./mlruns`` when ``None``.
        log_paths: log the data path and patient ids as they are (else salted hashes, or nothing).
        allow_conflicts: go on despite the audit's errors (label conflicts, leakage).
        intensity: how pixel values become 0..255; ``None``: the registered classifier's, else ``auto``.
        nifti_slice: slice of 3D volumes; ``None``: the registered classifier's, else the middle one.
        device: ``auto``, ``cpu``, ``cuda``, ``mps``.
        n_boot: bootstrap resamples of the intervals.
    """

    data: Path
    source: str
    name: str = DEFAULT_NAME
    alias: str = "champion"
    methods: tuple[str, ...] = DEFAULT_METHODS
    folds: int = 5
    repeats: int = 3
    choose_by: str = "logloss"
    target_coverage: float | None = 0.9
    target_accuracy: float | None = None
    seed: int = 0
    experiment: str = names.ADAPT
    tracking_uri: str | None = None
    log_paths: bool = False
    allow_conflicts: bool = False
    intensity: IntensityConfig | None = None
    nifti_slice: int | None = None
    device: str = "auto"
    n_boot: int = 1000

    @property
    def tracking(self) -> TrackingConfig:
        """The store and privacy settings, as the tracking package takes them."""
        return TrackingConfig(
            tracking_uri=self.tracking_uri, experiment=self.experiment, log_paths=self.log_paths
        )


@dataclass
class Candidate:
    """One configuration and its cross-validation: ``logits`` ``(repeats, n, C)`` out of fold, the
    temperature fitted to them, and the log-loss and accuracy they give (``error`` when it failed)."""

    method: str
    params: dict[str, Any]
    logits: np.ndarray | None = None
    temperature: float = 1.0
    log_loss: float = float("inf")
    accuracy: float = float("nan")
    error: str | None = None

    @property
    def label(self) -> str:
        """E.g. ``r2d2(features=l2, lam=0.1)``."""
        inside = ", ".join(f"{key}={value}" for key, value in self.params.items())
        return f"{self.method}({inside})" if inside else self.method


#: How the chosen candidate is found: the highest key wins, the first of equals is kept. ``clml`` has
#: one candidate, which chooses inside every fit.
CHOICE_KEYS: dict[str, Callable[[Candidate], Any]] = {
    "logloss": lambda candidate: -candidate.log_loss,
    "accuracy": lambda candidate: (candidate.accuracy, -candidate.log_loss),
    "clml": lambda candidate: -candidate.log_loss,
}


@dataclass(frozen=True)
class Source:
    """The backbone to adapt and what its source carries: a registered classifier's centring mean (the
    ``(D,)`` feature its method subtracts) and preprocessing (``None`` for a pipeline run, which logs
    neither)."""

    backbone: nn.Module
    spec: BackboneSpec
    base_feature_mean: Tensor | None
    preprocessing: Preprocessing | None
    description: str


@dataclass(frozen=True)
class LocalData:
    """Every local labelled image: ``images`` ``(n, S, S, C)`` uint8, ``labels`` ``(n,)``, ``groups``
    ``(n,)`` patient ids or ``None``, in the reader's order (class folders, then files, in natural
    order; manifest rows in order), and the dataset they were read as (its class names and digest)."""

    images: np.ndarray
    labels: np.ndarray
    groups: np.ndarray | None
    dataset: MedicalImageDataset

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.dataset.class_names


@dataclass(frozen=True)
class CrossValidation:
    """What cross-validation found: every candidate, the chosen one, the folds, the chosen one's
    metrics (``metrics`` uncalibrated, ``calibrated`` with cross-fitted temperatures), its calibrated
    out-of-fold probabilities ``oof`` ``(repeats, n, C)`` (the served model's temperature), and the
    threshold with the coverage and selective accuracy it gives on them."""

    candidates: list[Candidate]
    chosen: Candidate
    folds: Folds
    metrics: dict[str, Estimate]
    calibrated: dict[str, Estimate]
    oof: np.ndarray
    threshold: float | None
    coverage: float
    selective_accuracy: float


@dataclass(frozen=True)
class AdaptOutcome:
    """What ``adapt`` produced: the MLflow run, the URI to load the model by (``models:/NAME@ALIAS``
    when the alias moved to it, else ``models:/NAME/VERSION``), its registration, the
    cross-validation, the model card and the wall seconds per step."""

    run_id: str
    model_uri: str
    registration: Registration
    cv: CrossValidation
    card: dict[str, Any]
    seconds: dict[str, float]


def adapt(settings: AdaptSettings) -> AdaptOutcome:
    """Run the adapt pipeline (see the module docstring); every check comes before any heavy work."""
    check_settings(settings)
    seed_everything(settings.seed)
    seconds: dict[str, float] = {}
    with _timed("read and check the data", "load", seconds):
        source = load_source(settings.source, settings.tracking)
        preprocessing = _preprocessing(settings, source)
        data = read_local_data(settings.data, preprocessing)
        preprocessing = dataclasses.replace(preprocessing, channels=data.images.shape[-1])
        check_local_data(data)
        audit_local_data(settings.data, preprocessing.image_size, settings.allow_conflicts)
        folds = make_folds(data.labels, data.groups, settings.folds, settings.repeats, settings.seed)

    with _timed("embed and cross-validate", "cross_validate", seconds):
        device = resolve_device(settings.device)
        features = embed(source.backbone, data.images, source.spec, device)
        base_mean, base_mean_source = source.base_feature_mean, f"the mean carried by {source.description}"
        if base_mean is None:
            base_mean, base_mean_source = features.mean(dim=0), "the mean feature of the local images"
        context = MethodContext(base_mean, source.backbone, source.spec, device, settings.seed)
        candidates = candidate_configurations(settings)
        for candidate in candidates:
            cross_validate(candidate, context, features, data.labels, folds)
        chosen = choose(candidates, settings.choose_by)

    with _timed("measure, calibrate and refit", "refit", seconds):
        cv = measure(settings, data, candidates, chosen, folds)
        method = create_method(chosen.method, context, **chosen.params)
        classifier = fit_classifier(
            source.backbone,
            source.spec,
            method,
            data.images,
            data.labels,
            data.class_names,
            chosen.temperature,
            device,
            preprocessing=preprocessing,
            abstain_below=cv.threshold,
        )
        card = model_card(settings, data, source, base_mean_source, cv, classifier)

    with _timed("log and register", "register", seconds):
        run_id, registration = log_and_register(settings, data, classifier, cv, card, seconds)
    alias, version = f"@{registration.alias}", f"/{registration.version}"
    uri = f"models:/{registration.name}{alias if registration.holds_alias else version}"
    return AdaptOutcome(run_id, uri, registration, cv, card, seconds)


# --------------------------------------------------------------------------- checks, before any work


def check_settings(settings: AdaptSettings) -> None:
    """Refuse bad options and a missing data path (one line naming the option), before loading anything."""
    if not settings.data.exists():
        raise DataError(
            f"{settings.data}: no such folder or manifest; give a folder of class subfolders "
            "or a CSV manifest with columns path,label[,patient_id]"
        )
    if settings.data.is_file() and settings.data.suffix.lower() != ".csv":
        raise DataError(f"{settings.data}: a manifest must be a .csv file (path,label[,patient_id])")
    if settings.choose_by not in CHOICE_KEYS:
        raise ConfigError("--choose-by: " + not_one_of(settings.choose_by, "choice rule", CHOICE_KEYS))
    for name in settings.methods:
        if name not in METHODS:
            raise ConfigError("--methods: " + not_one_of(name, "few-shot method", METHODS))
        if METHODS[name].transductive:
            raise ConfigError(
                f"--methods: '{name}' is transductive (its answer for a file depends on the "
                "other files classified with it), so it cannot be served; drop it"
            )
        if METHODS[name].inputs != "features":
            raise ConfigError(
                f"--methods: '{name}' fine-tunes on images, too slow to cross-validate per "
                "candidate; choose frozen-feature methods (simpleshot, logreg, r2d2, …)"
            )
    if not settings.methods:
        raise ConfigError("--methods: name at least one method")
    if settings.folds < 2 or settings.repeats < 1:
        raise ConfigError(
            f"--folds {settings.folds} --repeats {settings.repeats}: need folds ≥ 2, repeats ≥ 1"
        )
    if (settings.target_coverage is None) == (settings.target_accuracy is None):
        raise ConfigError("give one of --target-coverage and --target-accuracy")
    target = settings.target_coverage if settings.target_accuracy is None else settings.target_accuracy
    if not 0 < target <= 1:
        raise ConfigError(f"the target coverage or accuracy must be in (0, 1], got {target}")
    if not settings.name.strip() or not settings.alias.strip():
        raise ConfigError("--name and --alias must not be empty")
    if settings.n_boot < 100:
        raise ConfigError(f"n_boot {settings.n_boot}: use at least 100 bootstrap resamples")


def load_source(source: str, settings: TrackingConfig) -> Source:
    """The backbone of a registered or logged classifier (``models:/…``, ``runs:/…``), with the
    base-class mean its method carries and its preprocessing, or of a pipeline run (its meta-trained,
    else pretrained backbone; see ``tracking.load_run_backbone``)."""
    if is_model_uri(source):
        classifier: FewShotClassifier = load_classifier(source, settings=settings)
        base_mean = getattr(classifier.method, "base_feature_mean", None)
        return Source(classifier.backbone, classifier.spec, base_mean, classifier.preprocessing, source)
    backbone, spec = tracking.load_run_backbone(source, settings)
    return Source(backbone, spec, None, None, f"run {source}")


def _preprocessing(settings: AdaptSettings, source: Source) -> Preprocessing:
    """How files become images: the backbone's size, and the intensity handling and slice given, else
    the source classifier's, else the defaults (3 channels until the local images are read)."""
    carried = source.preprocessing or Preprocessing(source.spec.image_size, 3)
    return Preprocessing(
        source.spec.image_size,
        3,
        settings.intensity or carried.intensity,
        carried.nifti_slice if settings.nifti_slice is None else settings.nifti_slice,
    )


def read_local_data(path: Path, preprocessing: Preprocessing) -> LocalData:
    """Every image of a class-subfolder tree or a CSV manifest at the backbone's size, all of them for
    cross-validation (split folders or a split column are pooled)."""
    reader = read_manifest if path.is_file() else read_image_folder
    dataset = reader(
        path,
        image_size=preprocessing.image_size,
        nifti_slice=preprocessing.nifti_slice,
        fractions=(1.0, 0.0, 0.0),
        intensity=preprocessing.intensity,
    )
    splits = [dataset.splits[name] for name in SPLITS if len(dataset.splits[name])]
    groups = None if splits[0].groups is None else np.concatenate([split.groups for split in splits])
    return LocalData(
        np.concatenate([split.images for split in splits]),
        np.concatenate([split.labels for split in splits]),
        groups,
        dataset,
    )


def check_local_data(data: LocalData) -> None:
    """At least 2 classes and 2 images per class: cross-validation must leave every class on the
    training side of every fold, so a class with 1 image is refused (leave-one-out would drop it)."""
    counts = np.bincount(data.labels, minlength=len(data.class_names))
    if len(data.class_names) < 2:
        raise DataError(f"the data holds one class ('{data.class_names[0]}'); a classifier needs at least 2")
    scarce = int(counts.argmin())
    if counts[scarce] < 2:
        raise DataError(
            f"class '{data.class_names[scarce]}' has {counts[scarce]} image; cross-validation needs at "
            "least 2 labelled images per class: add images or remove the class"
        )


def audit_local_data(path: Path, image_size: int, allow_conflicts: bool) -> None:
    """Refuse what the data audit (``fewshot_med.audit``) calls an error: label conflicts, leaks, unusable
    files; ``allow_conflicts`` turns the refusal into a warning. Duplicates across folds would inflate
    the cross-validated scores as surely as across splits."""
    errors = audit_dataset(path, AuditSettings(image_size=image_size)).errors()
    if not errors:
        return
    checks = Counter(finding.check for finding in errors)
    found = ", ".join(f"{count} {check}" for check, count in checks.items())
    if not allow_conflicts:
        raise DataError(
            f"{path}: the data audit found {found} (first: {errors[0].item}); run `fewshot-med audit "
            f"{path}` for the report and fix them, or pass --allow-conflicts"
        )
    warnings.warn(f"the data audit found {found}; going on (--allow-conflicts)", stacklevel=2)


# --------------------------------------------------------------------------- cross-validation


def candidate_configurations(settings: AdaptSettings) -> list[Candidate]:
    """The configurations to cross-validate: each method with every combination of its grid, or, for
    ``clml``, the Bayesian head over the ``select`` command's default grid, choosing inside each fit."""
    if settings.choose_by == "clml":
        grid = SelectionConfig()
        params = {"features": grid.features, "prior_precision": grid.prior_precision, "select_by": "clml"}
        return [Candidate("laplace_logreg", params)]
    return [
        Candidate(name, combination)
        for name in settings.methods
        for combination in search_combinations(SEARCH_GRIDS.get(name, {}))
    ]


def cross_validate(
    candidate: Candidate, context: MethodContext, features: Tensor, labels: np.ndarray, folds: Folds
) -> None:
    """Fill in ``candidate``'s out-of-fold logits, their temperature, log-loss and accuracy (or its
    ``error``, when a fold fit fails: it is then never chosen)."""
    factory = partial(create_method, candidate.method, context, **candidate.params)
    try:
        logits = out_of_fold_logits(factory, features, labels, folds)
    except (ValueError, RuntimeError) as error:
        candidate.error = f"{type(error).__name__}: {error}"
        return
    repeated = np.broadcast_to(labels, logits.shape[:2])
    scaler = TemperatureScaling(*TEMPERATURE_BOUNDS).fit(logits, repeated)
    candidate.logits, candidate.temperature = logits, scaler.temperature_
    candidate.log_loss = scaler.nll_after_
    candidate.accuracy = float((logits.argmax(axis=-1) == repeated).mean())


def choose(candidates: Sequence[Candidate], rule: str) -> Candidate:
    """The best candidate by ``CHOICE_KEYS[rule]`` among those that did not fail."""
    usable = [candidate for candidate in candidates if candidate.error is None]
    if not usable:
        raise DataError(f"every candidate failed to fit; the first: {candidates[0].error}")
    return max(usable, key=CHOICE_KEYS[rule])  # max keeps the first of equals


def measure(
    settings: AdaptSettings, data: LocalData, candidates: list[Candidate], chosen: Candidate, folds: Folds
) -> CrossValidation:
    """The chosen candidate's metrics with bootstrap CIs, before and after calibration (each fold's
    images scored with a temperature fitted on the other folds), and the abstention threshold on its
    out-of-fold probabilities under the served temperature (fitted on all of them)."""
    labels = data.labels
    scores = partial(
        cv_metrics, groups=data.groups, n_boot=settings.n_boot, seed=settings.seed, n_bins=ECE_BINS
    )
    metrics = scores(softmax(chosen.logits), labels)
    per_fold = cross_fitted_temperatures(chosen.logits, labels, folds, *TEMPERATURE_BOUNDS)
    calibrated = scores(calibrated_probs(chosen.logits, per_fold), labels)
    oof = calibrated_probs(chosen.logits, chosen.temperature)
    threshold, coverage, selective_accuracy = abstention_threshold(
        oof, labels, coverage=settings.target_coverage, accuracy=settings.target_accuracy
    )
    if settings.target_accuracy is not None and selective_accuracy < settings.target_accuracy:
        warnings.warn(
            f"no out-of-fold coverage reaches a selective accuracy of {settings.target_accuracy}; the "
            f"classifier will not abstain (out-of-fold accuracy {selective_accuracy:.3f})",
            stacklevel=2,
        )
    return CrossValidation(
        candidates, chosen, folds, metrics, calibrated, oof, threshold, coverage, selective_accuracy
    )


def model_card(
    settings: AdaptSettings,
    data: LocalData,
    source: Source,
    base_mean_source: str,
    cv: CrossValidation,
    classifier: FewShotClassifier,
) -> dict[str, Any]:
    """The card of the refitted classifier (``deploy.model_card.build_card``)."""
    by_accuracy = settings.target_accuracy is not None
    target_value = settings.target_accuracy if by_accuracy else settings.target_coverage
    return build_card(
        name=settings.name,
        class_names=data.class_names,
        class_counts=np.bincount(data.labels, minlength=len(data.class_names)).tolist(),
        n_patients=None if data.groups is None else len(np.unique(data.groups)),
        data_digest=data.dataset.digest,
        preprocessing=classifier.preprocessing,
        method=cv.chosen.method,
        params={**cv.chosen.params, **_chosen_inside(classifier.method)},
        temperature=cv.chosen.temperature,
        backbone=source.spec,
        backbone_source=source.description,
        base_mean_source=base_mean_source,
        choice={
            "rule": settings.choose_by,
            "candidates": len(cv.candidates),
            "scheme": cv.folds.scheme,
            "folds": cv.folds.n_folds,
            "repeats": cv.folds.n_repeats,
            "seed": settings.seed,
            "n_boot": settings.n_boot,
        },
        metrics=cv.metrics,
        calibrated=cv.calibrated,
        confusion=confusion_counts(cv.chosen.logits, data.labels),
        abstention={
            "target": "accuracy" if by_accuracy else "coverage",
            "target_value": target_value,
            "threshold": cv.threshold,
            "coverage": cv.coverage,
            "selective_accuracy": cv.selective_accuracy,
            "reached": not by_accuracy or cv.selective_accuracy >= target_value,
        },
    )


def _chosen_inside(method: Any) -> dict[str, Any]:
    """What a self-selecting method (``laplace_logreg`` under ``clml``) chose on all the images."""
    chosen = getattr(method, "candidates_", None)
    if not chosen or len(chosen) < 2:
        return {}
    pick = chosen[int(method.choice_[0])]
    return {"chosen_features": pick.features, "chosen_prior_precision": pick.prior_precision}


# --------------------------------------------------------------------------- tracking


def log_and_register(
    settings: AdaptSettings,
    data: LocalData,
    classifier: FewShotClassifier,
    cv: CrossValidation,
    card: dict[str, Any],
    seconds: dict[str, float],
) -> tuple[str, Registration]:
    """One MLflow ``adapt`` run (settings and chosen parameters, cross-validated metrics, every
    candidate's score, the out-of-fold predictions, plots, the model with its card), then the registry.
    No data path, file name or patient id is logged unless ``log_paths``.

    Returns:
        The run id and the registration.
    """
    chosen = cv.chosen
    tags = {
        names.STAGE_TAG: names.ADAPT,
        names.METHOD_TAG: chosen.label,
        names.DATA_DIGEST_TAG: data.dataset.digest,
        (names.FROM_MODEL_TAG if is_model_uri(settings.source) else names.FROM_RUN_TAG): settings.source,
    }
    params = {
        "data": redact_path(settings.data.resolve(), settings.log_paths),
        "choose_by": settings.choose_by,
        "methods": names.list_value(settings.methods),
        "scheme": cv.folds.scheme,
        "folds": cv.folds.n_folds,
        "repeats": cv.folds.n_repeats,
        "seed": settings.seed,
        "target_coverage": settings.target_coverage,
        "target_accuracy": settings.target_accuracy,
        "method": chosen.method,
        **{names.metric_key("params", key): value for key, value in card["model"]["params"].items()},
        **tracking.flatten_params({"preprocessing": card["data"]["preprocessing"]}),
    }
    metrics = {}
    for calibrated, estimates in ((False, cv.metrics), (True, cv.calibrated)):
        pairs = {metric: (estimates[metric].value, estimates[metric].half_width) for metric in CV_METRICS}
        metrics |= tracking.summary_metrics(pairs, partial(names.adapt_metric, calibrated=calibrated))
    recalls = {
        names.recall_metric(name): (
            cv.metrics[f"recall.{index}"].value,
            cv.metrics[f"recall.{index}"].half_width,
        )
        for index, name in enumerate(data.class_names)
    }
    metrics |= tracking.summary_metrics(recalls, names.adapt_metric)
    metrics |= {
        names.adapt_value("temperature"): chosen.temperature,
        names.adapt_value("threshold"): cv.threshold,
        names.adapt_value("oof_coverage"): cv.coverage,
        names.adapt_value("oof_selective_accuracy"): cv.selective_accuracy,
        names.adapt_value("images"): len(data.labels),
        **{names.time_metric(step): value for step, value in seconds.items()},
    }
    description = card_markdown(card)
    with tracking.benchmark_run(names.ADAPT, settings.experiment, tags, settings.tracking) as run:
        tracking.log_params({names.adapt_param(key): value for key, value in params.items()})
        tracking.log_metrics(metrics)
        tracking.log_text_artifact(_candidates_csv(cv.candidates, chosen), names.ADAPT_CANDIDATES)
        tracking.log_text_artifact(_predictions_csv(data, cv, settings.log_paths), names.ADAPT_PREDICTIONS)
        tracking.log_dict_artifact(card, names.MODEL_CARD_JSON)
        tracking.log_text_artifact(description, names.MODEL_CARD)
        _log_plots(data, cv)
        uri = tracking.log_classifier(classifier, card=card)
        score = cv.metrics["accuracy"].value
        registration = tracking.register_model(
            uri, settings.name, description, score, names.adapt_metric("accuracy"), alias=settings.alias
        )
        tracking.set_tags(
            {
                names.REGISTERED_MODEL_TAG: registration.name,
                names.REGISTERED_VERSION_TAG: registration.version,
                names.holds_alias_tag(registration.alias): str(registration.holds_alias).lower(),
            }
        )
    return run.run_id, registration


def _candidates_csv(candidates: Sequence[Candidate], chosen: Candidate) -> str:
    """Every candidate with its out-of-fold log-loss (after its temperature), accuracy and error."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["candidate", "method", "log_loss", "accuracy", "temperature", "chosen", "error"])
    for c in candidates:
        writer.writerow(
            [c.label, c.method, c.log_loss, c.accuracy, c.temperature, c is chosen, c.error or ""]
        )
    return buffer.getvalue()


def _predictions_csv(data: LocalData, cv: CrossValidation, log_paths: bool) -> str:
    """The calibrated out-of-fold predictions, one row per image and repeat: the image's position in
    the reader's order (its patient id only with ``log_paths``), true class, repeat, fold, class
    probabilities, confidence and whether the threshold abstains."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    patients = data.groups is not None and log_paths
    header = ["image", *(["patient_id"] if patients else []), "label", "repeat", "fold", *data.class_names]
    writer.writerow([*header, "confidence", "abstain"])
    for repeat, probs in enumerate(cv.oof):
        for index, row in enumerate(probs):
            confidence = float(row.max())
            patient = [data.groups[index]] if patients else []
            fold = int(cv.folds.fold[repeat, index])
            abstains = cv.threshold is not None and confidence < cv.threshold
            label = data.class_names[data.labels[index]]
            writer.writerow([index, *patient, label, repeat, fold, *map(float, row), confidence, abstains])
    return buffer.getvalue()


def _log_plots(data: LocalData, cv: CrossValidation) -> None:
    """Confusion matrix, reliability diagram (before and after the temperature) and risk-coverage curve
    with the threshold's coverage marked, on the out-of-fold predictions of every repeat pooled."""
    from fewshot_med.evaluation.plots import (
        confusion_matrix_figure,
        reliability_diagram,
        risk_coverage_figure,
    )
    from fewshot_med.evaluation.selective import risk_coverage_curve

    labels = np.tile(data.labels, cv.folds.n_repeats)
    raw = softmax(cv.chosen.logits).reshape(len(labels), -1)
    calibrated = cv.oof.reshape(len(labels), -1)
    title = f"{cv.chosen.label}, out of fold ({cv.folds.n_repeats} repeat(s))"
    figure = confusion_matrix_figure(labels, calibrated.argmax(axis=1), data.class_names, title=title)
    tracking.log_figure(figure, names.plot_path(names.CONFUSION))
    figure = reliability_diagram(raw, labels, calibrated_probs=calibrated, n_bins=ECE_BINS, title=title)
    tracking.log_figure(figure, names.plot_path(names.RELIABILITY))
    curves = {cv.chosen.label: risk_coverage_curve(calibrated, labels)}
    figure = risk_coverage_figure(curves, title=title)
    if cv.threshold is not None:
        figure.axes[0].axvline(cv.coverage, color="grey", linestyle="--", label="abstention threshold")
        figure.axes[0].legend(fontsize="small")
    tracking.log_figure(figure, names.plot_path(names.RISK_COVERAGE))


def is_model_uri(source: str) -> bool:
    """Whether ``--from`` names a logged or registered classifier rather than a pipeline run."""
    return source.startswith(("models:/", "runs:/"))


@contextmanager
def _timed(what: str, step: str, seconds: dict[str, float]) -> Iterator[None]:
    """Record a step's wall time in ``seconds[step]`` and say it on stderr."""
    start = time.perf_counter()
    yield
    seconds[step] = time.perf_counter() - start
    print(f"adapt: {what}: {seconds[step]:.1f} s", file=sys.stderr)


def intensity_from_options(options: Sequence[str]) -> IntensityConfig | None:
    """``["mode=window", "center=40", "width=400"]`` (``--intensity``, repeatable) as an
    ``IntensityConfig``; ``None`` for no options."""
    import yaml
    from pydantic import ValidationError

    if not options:
        return None
    values = {}
    for option in options:
        key, sep, value = option.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--intensity {option}: write key=value, e.g. mode=window, center=40")
        values[key.strip()] = yaml.safe_load(value)
    try:
        return IntensityConfig.model_validate(values)
    except ValidationError as error:
        first = error.errors()[0]
        where = "".join(f" {part}" for part in first["loc"])
        raise ConfigError(f"--intensity{where}: {first['msg'].removeprefix('Value error, ')}") from None


def summary(outcome: AdaptOutcome) -> str:
    """A few lines for the terminal: the choice, the headline metrics with CIs, the threshold."""
    cv, card = outcome.cv, outcome.card
    choice = card["selection"]
    inside = [
        f"{k.removeprefix('chosen_')}={v}"
        for k, v in card["model"]["params"].items()
        if k.startswith("chosen_")
    ]
    chosen = f"{cv.chosen.method}({', '.join(inside)} on all images)" if inside else cv.chosen.label
    lines = [
        f"chosen {chosen} by {choice['rule']} among {choice['candidates']} candidate(s); "
        f"{cv.folds.scheme} cross-validation, {cv.folds.n_folds} folds x {cv.folds.n_repeats} repeat(s)"
    ]
    for label, metric, estimates in (
        ("accuracy", "accuracy", cv.metrics),
        ("balanced accuracy", "balanced_accuracy", cv.metrics),
        ("macro AUROC", "macro_auroc", cv.metrics),
        ("ECE, calibrated", "ece", cv.calibrated),
        ("NLL, calibrated", "nll", cv.calibrated),
    ):
        e = estimates[metric]
        lines.append(f"  {label:<18} {e.value:.3f}  [{e.low:.3f}, {e.high:.3f}]")
    if cv.threshold is None:
        lines.append("never abstains")
    else:
        lines.append(
            f"abstains below {cv.threshold:.3f}: out of fold it keeps {cv.coverage:.1%} of the images at "
            f"accuracy {cv.selective_accuracy:.3f}"
        )
    registration = outcome.registration
    if not registration.holds_alias:
        lines.append(
            f"the alias '{registration.alias}' stays on an earlier version of {registration.name} with a "
            f"higher cross-validated accuracy; this one is version {registration.version}"
        )
    lines.append(f"MLflow run {outcome.run_id}  (browse with: fewshot-med ui)")
    return "\n".join(lines)
