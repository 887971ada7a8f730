"""What a report of an evaluation run needs, gathered from MLflow into a local folder.

``collect_run`` accepts the id of a pipeline run or of any run nested in it (a stage run such as
``evaluate``, or a ``method:<label>`` run), walks up to the pipeline run, downloads the results
tables, the config and the plots, and returns a ``RunReview``: plain data that the report renderers
turn into HTML or markdown without MLflow. Every name it looks up is built with ``names`` from what
the run says about itself (its methods' ``method`` and ``shots`` tags, its ``calibration`` param).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from fewshot_med.errors import FewshotMedError
from fewshot_med.tracking import names
from fewshot_med.tracking._store import sqlite_path
from fewshot_med.tracking.runs import VERSIONED_PACKAGES, store_uri

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run

    from fewshot_med.config import TrackingConfig

#: Section title of the plots that compare methods (logged on the pipeline run).
CROSS_METHOD_SECTION = "Across methods"
#: Per training stage, its metrics summarised in the report (``names.stage_metric``) with a label.
_TRAINING: dict[str, dict[str, str]] = {
    names.PRETRAIN: {
        "best_val_balanced_accuracy": "pretraining: best val balanced accuracy (base classes)",
        "best_epoch": "pretraining: best epoch",
    },
    names.META_TRAIN: {
        "best_val_accuracy": "meta-training: best val episode accuracy (novel classes)",
        "best_episode": "meta-training: best episode",
    },
}
#: Stage metrics summarised in the report, with a human label, when the stage ran.
TRAINING_METRICS: dict[str, str] = {
    names.stage_metric(stage, field): label
    for stage, fields in _TRAINING.items()
    for field, label in fields.items()
}
#: Those of ``TRAINING_METRICS`` that are fractions (shown in percent).
TRAINING_FRACTIONS = frozenset(
    {
        names.stage_metric(names.PRETRAIN, "best_val_balanced_accuracy"),
        names.stage_metric(names.META_TRAIN, "best_val_accuracy"),
    }
)
_MAX_LINEAGE_HOPS = 8


class ReportPlot(NamedTuple):
    """One figure of the report: the section it belongs to, a caption, and the downloaded PNG."""

    section: str
    caption: str
    path: Path


@dataclass(frozen=True)
class CalibratorFit:
    """The fitted parameters of one calibrator for one method and K (``calibration.*`` metrics)."""

    method: str
    k_shot: int
    calibrator: str
    params: dict[str, float]


@dataclass(frozen=True)
class RunReview:
    """An evaluation run as a report shows it; every path lies in ``collect_run``'s destination."""

    run_id: str
    run_name: str
    experiment_name: str
    status: str
    start_time: datetime | None
    duration: timedelta | None
    evaluate_run_id: str
    config_name: str | None
    dataset: str | None
    data_source: str | None
    data_digest: str | None
    git_commit: str | None
    git_dirty: str | None
    seed: str | None
    backbone: str | None
    stages: str | None
    from_run: str | None
    methods: list[str]
    results_markdown: str
    results_csv: Path | None
    config_yaml: Path | None
    shots: list[int] = field(default_factory=list)
    calibrations: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    training: dict[str, float] = field(default_factory=dict)
    calibration: list[CalibratorFit] = field(default_factory=list)
    plots: list[ReportPlot] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)


def collect_run(
    run_id: str, destination: Path, settings: TrackingConfig | None = None, with_plots: bool = True
) -> RunReview:
    """Gather a pipeline run's evaluation results and download what a report shows into ``destination``.

    Args:
        run_id: id of a pipeline run (as printed by ``fewshot-med run``/``evaluate``) or of a run
            nested in it: its ``evaluate`` stage (that one is reported), another stage, or a
            ``method:<label>`` run.
        destination: folder to download into (created if needed): ``results.md``, ``results.csv``,
            ``config.yaml``, the cross-method ``plots/`` and ``methods/<label>/plots/``.
        settings: the tracking section of a config (which store to read); see ``store_uri``.
        with_plots: download the plots (``False``: ``plots`` stays empty).

    Returns:
        The review; its ``plots`` come cross-method first, then per method in evaluation order
        (reliability per K, confusion per K, generalised confusion per K).

    Raises:
        FewshotMedError: the store or the run does not exist, or the run has no evaluation results.
    """
    from mlflow import MlflowClient

    uri = store_uri(settings)
    database = sqlite_path(uri)
    if database is not None and not database.is_file():
        raise FewshotMedError(
            f"no MLflow store at {database.parent}: pass --tracking-uri with the folder (or URI) of the "
            "store that holds the run"
        )
    with _no_progress_bars():
        return _collect(MlflowClient(uri), run_id, uri, Path(destination), with_plots)


def _collect(client: MlflowClient, run_id: str, uri: str, destination: Path, with_plots: bool) -> RunReview:
    run = _get_run(client, run_id, uri)
    pipeline, evaluate = _pipeline_and_evaluate(client, run)
    destination.mkdir(parents=True, exist_ok=True)

    evaluate_files = _artifact_paths(client, evaluate.info.run_id)
    if names.RESULTS_MD not in evaluate_files:
        raise FewshotMedError(
            f"the evaluate stage {evaluate.info.run_id} of run {pipeline.info.run_id} logged no results "
            f"(status {evaluate.info.status}); pass the id of a run whose evaluation finished"
        )
    results_md = Path(client.download_artifacts(evaluate.info.run_id, names.RESULTS_MD, str(destination)))
    pipeline_files = _artifact_paths(client, pipeline.info.run_id)
    results_csv = _download(client, evaluate.info.run_id, names.RESULTS_CSV, evaluate_files, destination)
    config_yaml = _download(client, pipeline.info.run_id, names.CONFIG, pipeline_files, destination)

    calibrations = names.list_items(evaluate.data.params.get(names.CALIBRATION_PARAM))
    methods, shots, calibration, plots, folders = [], set(), [], [], set()
    for method_run in _children(client, evaluate):
        tags = method_run.data.tags
        label = tags.get(names.METHOD_TAG)
        if label is None or tags.get(names.STAGE_TAG) != names.method_stage(label):
            continue
        method_shots = sorted(int(k) for k in names.list_items(tags.get(names.SHOTS_TAG)))
        methods.append(label)
        shots.update(method_shots)
        calibration += _calibrator_fits(label, method_shots, calibrations, method_run.data.metrics)
        if not with_plots:
            continue
        slug = _slug(label)
        while slug in folders:  # labels that differ only in characters a folder name cannot hold
            slug += "_"
        folders.add(slug)
        folder = destination / "methods" / slug
        section = f"Method: {label}"
        plots += _plots(
            client, method_run.info.run_id, names.METHOD_PLOTS, method_shots, folder, section, label
        )
    if with_plots:
        cross = _plots(
            client,
            pipeline.info.run_id,
            names.PIPELINE_PLOTS,
            sorted(shots),
            destination,
            CROSS_METHOD_SECTION,
        )
        plots = cross + plots

    tags, params = pipeline.data.tags, pipeline.data.params
    info = pipeline.info
    start = _timestamp(info.start_time)
    end = _timestamp(info.end_time)
    return RunReview(
        run_id=info.run_id,
        run_name=info.run_name or info.run_id,
        experiment_name=client.get_experiment(info.experiment_id).name,
        status=info.status,
        start_time=start,
        duration=end - start if start and end else None,
        evaluate_run_id=evaluate.info.run_id,
        config_name=params.get("name"),
        dataset=tags.get(names.DATA_NAME_TAG) or params.get("data.source"),
        data_source=tags.get(names.DATA_SOURCE_TAG) or params.get("data.source"),
        data_digest=tags.get(names.DATA_DIGEST_TAG),
        git_commit=tags.get(names.GIT_COMMIT_TAG),
        git_dirty=tags.get(names.GIT_DIRTY_TAG),
        seed=tags.get(names.SEED_TAG) or params.get("seed"),
        backbone=tags.get(names.BACKBONE_TAG) or params.get("model.backbone"),
        stages=tags.get(names.STAGES_TAG),
        from_run=tags.get(names.FROM_RUN_TAG),
        methods=methods,
        results_markdown=results_md.read_text(encoding="utf-8"),
        results_csv=results_csv,
        config_yaml=config_yaml,
        shots=sorted(shots),
        calibrations=calibrations,
        metrics=dict(pipeline.data.metrics),
        training=_training_summary(client, pipeline),
        calibration=calibration,
        plots=plots,
        versions={
            package: tags[names.version_tag(package)]
            for package in VERSIONED_PACKAGES
            if names.version_tag(package) in tags
        },
    )


def _get_run(client: MlflowClient, run_id: str, uri: str) -> Run:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException as error:
        if error.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise FewshotMedError(f"cannot read run '{run_id}' from {uri}: {reason}") from error
        raise FewshotMedError(
            f"no MLflow run '{run_id}' in {uri}: pass the id of a pipeline run (printed by "
            "'fewshot-med run' or 'fewshot-med evaluate') or of its evaluate stage, and --tracking-uri "
            "if it is in another store"
        ) from None


def _pipeline_and_evaluate(client: MlflowClient, run: Run) -> tuple[Run, Run]:
    """The pipeline run above ``run`` (stage runs carry a ``stage`` tag) and its evaluate stage run."""
    evaluate = run if run.data.tags.get(names.STAGE_TAG) == names.EVALUATE else None
    pipeline = run
    for _ in range(_MAX_LINEAGE_HOPS):
        parent_id = pipeline.data.tags.get(names.PARENT_RUN_TAG)
        if names.STAGE_TAG not in pipeline.data.tags or not parent_id:
            break
        pipeline = client.get_run(parent_id)
        if evaluate is None and pipeline.data.tags.get(names.STAGE_TAG) == names.EVALUATE:
            evaluate = pipeline
    if evaluate is None:
        evaluate = _stage_child(client, pipeline, names.EVALUATE)
    if evaluate is None:
        stage = run.data.tags.get(names.STAGE_TAG)
        stages = pipeline.data.tags.get(names.STAGES_TAG) or "no stages"
        what = f"{stage} stage run" if stage else f"run ({stages})"
        raise FewshotMedError(
            f"{what} {run.info.run_id} has no finished evaluation: pass the id of a pipeline run that ran "
            "the evaluate stage ('fewshot-med run' or 'fewshot-med evaluate' print it)"
        )
    return pipeline, evaluate


def _children(client: MlflowClient, run: Run, stage: str | None = None) -> list[Run]:
    """Runs nested directly in ``run`` (optionally of one stage), oldest first."""
    query = f"tags.{names.PARENT_RUN_TAG} = '{run.info.run_id}'"
    if stage is not None:
        query += f" and tags.{names.STAGE_TAG} = '{stage}'"
    return list(
        client.search_runs(
            [run.info.experiment_id], filter_string=query, order_by=["attributes.start_time ASC"]
        )
    )


def _stage_child(client: MlflowClient, run: Run, stage: str) -> Run | None:
    """The latest FINISHED ``stage`` run nested in ``run``."""
    finished = [child for child in _children(client, run, stage) if child.info.status == "FINISHED"]
    return finished[-1] if finished else None


def _training_summary(client: MlflowClient, pipeline: Run) -> dict[str, float]:
    """Best-checkpoint metrics of the pretrain and meta-train stages, following ``from_run`` when the
    pipeline started from an earlier run's backbone."""
    from mlflow.exceptions import MlflowException

    summary: dict[str, float] = {}
    pending = dict(_TRAINING)
    run, seen = pipeline, set()
    while run is not None and pending and run.info.run_id not in seen and len(seen) < _MAX_LINEAGE_HOPS:
        seen.add(run.info.run_id)
        for stage in list(pending):
            own = run.data.tags.get(names.STAGE_TAG) == stage
            source = run if own else _stage_child(client, run, stage)
            if source is None:
                continue
            keys = [names.stage_metric(stage, field) for field in pending.pop(stage)]
            summary.update({key: source.data.metrics[key] for key in keys if key in source.data.metrics})
        earlier = run.data.tags.get(names.FROM_RUN_TAG)
        try:
            run = client.get_run(earlier) if earlier else None
        except MlflowException:
            run = None
    return {key: summary[key] for key in TRAINING_METRICS if key in summary}


def _calibrator_fits(
    method: str, shots: Sequence[int], calibrators: Sequence[str], metrics: dict[str, float]
) -> list[CalibratorFit]:
    """The ``names.calibration_metric`` parameters of a method run, per K and calibrator that logged any."""
    first = lambda name: ("temperature" not in name, name)  # noqa: E731  (the fitted value leads)
    fits = []
    for k_shot in shots:
        for calibrator in calibrators:
            prefix = names.calibration_prefix(k_shot, calibrator)
            params = {
                key.removeprefix(prefix): value for key, value in metrics.items() if key.startswith(prefix)
            }
            if params:
                ordered = {name: params[name] for name in sorted(params, key=first)}
                fits.append(CalibratorFit(method, k_shot, calibrator, ordered))
    return fits


def _artifact_paths(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    return {artifact.path for artifact in client.list_artifacts(run_id, path)}


def _download(
    client: MlflowClient, run_id: str, path: str, available: set[str], destination: Path
) -> Path | None:
    if path not in available:
        return None
    return Path(client.download_artifacts(run_id, path, str(destination)))


#: Caption template per plot kind (``{k}`` is K, ``{method}`` the method label).
_CAPTIONS: dict[str, str] = {
    names.ACCURACY_VS_SHOTS: "Test accuracy against K, every method (mean ± 95% CI over episodes).",
    names.RISK_COVERAGE: (
        "{k}-shot risk-coverage: error rate among the most confident test queries as coverage grows "
        "(lower is better; mean over episodes)."
    ),
    names.RELIABILITY: (
        "{method}, {k}-shot reliability diagram: confidence against accuracy over pooled test queries, "
        "uncalibrated and after calibration."
    ),
    names.CONFUSION: "{method}, {k}-shot confusion matrix over the novel classes, pooled over test episodes.",
    names.GENERALISED_CONFUSION: (
        "{method}, {k}-shot generalised setting: confusion matrix over base and novel classes together."
    ),
}


def _plots(
    client: MlflowClient,
    run_id: str,
    kinds: Sequence[str],
    shots: Sequence[int],
    destination: Path,
    section: str,
    method: str | None = None,
) -> list[ReportPlot]:
    """The run's plots of ``kinds`` at ``shots`` (``names.plot_paths``, in that order) that it logged,
    downloaded into ``destination``."""
    if names.PLOTS_DIR not in _artifact_paths(client, run_id):
        return []
    logged = _artifact_paths(client, run_id, names.PLOTS_DIR)
    found = [(kind, k, path) for kind, k, path in names.plot_paths(kinds, shots) if path in logged]
    if not found:
        return []
    destination.mkdir(parents=True, exist_ok=True)
    local = Path(client.download_artifacts(run_id, names.PLOTS_DIR, str(destination)))
    return [
        ReportPlot(section, _CAPTIONS[kind].format(k=k, method=method), local / Path(path).name)
        for kind, k, path in found
    ]


def _timestamp(milliseconds: int | None) -> datetime | None:
    return None if milliseconds is None else datetime.fromtimestamp(milliseconds / 1000, tz=timezone.utc)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "method"


@contextmanager
def _no_progress_bars() -> Iterator[None]:
    """Silence MLflow's per-download progress bars (a report downloads a dozen small folders)."""
    name = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    before = os.environ.get(name)
    os.environ[name] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before
