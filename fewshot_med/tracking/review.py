"""What a report of an evaluation run needs, gathered from MLflow into a local folder.

``collect_run`` accepts the id of a pipeline run or of any run nested in it (a stage run such as
``evaluate``, or a ``method:<label>`` run), walks up to the pipeline run, downloads the results
tables, the config and the plots, and returns a ``RunReview``: plain data that the report renderers
turn into HTML or markdown without MLflow.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from fewshot_med.errors import FewshotMedError
from fewshot_med.tracking._store import sqlite_path
from fewshot_med.tracking.runs import store_uri

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run

    from fewshot_med.config import TrackingConfig

#: Section title of the plots that compare methods (logged on the pipeline run).
CROSS_METHOD_SECTION = "Across methods"
#: Stage metrics summarised in the report, with a human label, when the stage ran.
TRAINING_METRICS: dict[str, str] = {
    "pretrain.best_val_balanced_accuracy": "pretraining: best val balanced accuracy (base classes)",
    "pretrain.best_epoch": "pretraining: best epoch",
    "meta_train.best_val_accuracy": "meta-training: best val episode accuracy (novel classes)",
    "meta_train.best_episode": "meta-training: best episode",
}
_PARENT_TAG = "mlflow.parentRunId"
_PLOT_NAME = re.compile(r"^(?P<kind>.+?)_(?P<k>\d+)shot\.png$")
_CALIBRATION_METRIC = re.compile(r"^calibration\.(?P<k>\d+)shot\.(?P<calibrator>[^.]+)\.(?P<param>.+)$")
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
    training: dict[str, float] = field(default_factory=dict)
    calibration: list[CalibratorFit] = field(default_factory=list)
    plots: list[ReportPlot] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)


def collect_run(run_id: str, destination: Path, settings: TrackingConfig | None = None) -> RunReview:
    """Gather a pipeline run's evaluation results and download what a report shows into ``destination``.

    Args:
        run_id: id of a pipeline run (as printed by ``fewshot-med run``/``evaluate``) or of a run
            nested in it: its ``evaluate`` stage (that one is reported), another stage, or a
            ``method:<label>`` run.
        destination: folder to download into (created if needed): ``results.md``, ``results.csv``,
            ``config.yaml``, the cross-method ``plots/`` and ``methods/<label>/plots/``.
        settings: the tracking section of a config (which store to read); see ``store_uri``.

    Returns:
        The review; its ``plots`` come cross-method first, then per method in evaluation order
        (reliability per K, confusion per K, generalised confusion per K, any others).

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
        return _collect(MlflowClient(uri), run_id, uri, Path(destination))


def _collect(client: MlflowClient, run_id: str, uri: str, destination: Path) -> RunReview:
    run = _get_run(client, run_id, uri)
    pipeline, evaluate = _pipeline_and_evaluate(client, run)
    destination.mkdir(parents=True, exist_ok=True)

    evaluate_files = _artifact_paths(client, evaluate.info.run_id)
    if "results.md" not in evaluate_files:
        raise FewshotMedError(
            f"the evaluate stage {evaluate.info.run_id} of run {pipeline.info.run_id} logged no results "
            f"(status {evaluate.info.status}); pass the id of a run whose evaluation finished"
        )
    results_md = Path(client.download_artifacts(evaluate.info.run_id, "results.md", str(destination)))
    pipeline_files = _artifact_paths(client, pipeline.info.run_id)
    results_csv = _download(client, evaluate.info.run_id, "results.csv", evaluate_files, destination)
    config_yaml = _download(client, pipeline.info.run_id, "config.yaml", pipeline_files, destination)

    plots = _plots(client, pipeline.info.run_id, "plots", destination, CROSS_METHOD_SECTION, None)
    methods, calibration, folders = [], [], set()
    for method_run in _children(client, evaluate):
        if not method_run.data.tags.get("stage", "").startswith("method:"):
            continue
        label = method_run.data.tags.get("method") or method_run.info.run_name.removeprefix("method:")
        methods.append(label)
        calibration += _calibrator_fits(label, method_run.data.metrics)
        slug = _slug(label)
        while slug in folders:  # labels that differ only in characters a folder name cannot hold
            slug += "_"
        folders.add(slug)
        folder = destination / "methods" / slug
        plots += _plots(client, method_run.info.run_id, "plots", folder, f"Method: {label}", label)

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
        dataset=tags.get("data.name") or params.get("data.source"),
        data_source=tags.get("data.source") or params.get("data.source"),
        data_digest=tags.get("data.digest"),
        git_commit=tags.get("git_commit"),
        git_dirty=tags.get("git_dirty"),
        seed=tags.get("seed") or params.get("seed"),
        backbone=tags.get("backbone") or params.get("model.backbone"),
        stages=tags.get("stages"),
        from_run=tags.get("from_run"),
        methods=methods,
        results_markdown=results_md.read_text(encoding="utf-8"),
        results_csv=results_csv,
        config_yaml=config_yaml,
        training=_training_summary(client, pipeline),
        calibration=calibration,
        plots=plots,
        versions={
            key.removeprefix("version."): value for key, value in tags.items() if key.startswith("version.")
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
    evaluate = run if run.data.tags.get("stage") == "evaluate" else None
    pipeline = run
    for _ in range(_MAX_LINEAGE_HOPS):
        parent_id = pipeline.data.tags.get(_PARENT_TAG)
        if "stage" not in pipeline.data.tags or not parent_id:
            break
        pipeline = client.get_run(parent_id)
        if evaluate is None and pipeline.data.tags.get("stage") == "evaluate":
            evaluate = pipeline
    if evaluate is None:
        evaluate = _stage_child(client, pipeline, "evaluate")
    if evaluate is None:
        stage = run.data.tags.get("stage")
        what = f"{stage} stage run" if stage else f"run ({pipeline.data.tags.get('stages') or 'no stages'})"
        raise FewshotMedError(
            f"{what} {run.info.run_id} has no finished evaluation: pass the id of a pipeline run that ran "
            "the evaluate stage ('fewshot-med run' or 'fewshot-med evaluate' print it)"
        )
    return pipeline, evaluate


def _children(client: MlflowClient, run: Run, stage: str | None = None) -> list[Run]:
    """Runs nested directly in ``run`` (optionally of one stage), oldest first."""
    query = f"tags.{_PARENT_TAG} = '{run.info.run_id}'"
    if stage is not None:
        query += f" and tags.stage = '{stage}'"
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
    stages = {name.partition(".")[0] for name in TRAINING_METRICS}
    run, seen = pipeline, set()
    while run is not None and stages and run.info.run_id not in seen and len(seen) < _MAX_LINEAGE_HOPS:
        seen.add(run.info.run_id)
        for stage in sorted(stages):
            source = run if run.data.tags.get("stage") == stage else _stage_child(client, run, stage)
            if source is None:
                continue
            found = {key: source.data.metrics[key] for key in TRAINING_METRICS if key in source.data.metrics}
            summary.update({key: value for key, value in found.items() if key.startswith(stage + ".")})
            stages.discard(stage)
        earlier = run.data.tags.get("from_run")
        try:
            run = client.get_run(earlier) if earlier else None
        except MlflowException:
            run = None
    return {key: summary[key] for key in TRAINING_METRICS if key in summary}


def _calibrator_fits(method: str, metrics: dict[str, float]) -> list[CalibratorFit]:
    """``calibration.<K>shot.<calibrator>.<param>`` metrics grouped per (K, calibrator)."""
    grouped: dict[tuple[int, str], dict[str, float]] = {}
    for name, value in metrics.items():
        match = _CALIBRATION_METRIC.match(name)
        if match:
            key = (int(match["k"]), match["calibrator"])
            grouped.setdefault(key, {})[match["param"]] = value
    first = lambda name: ("temperature" not in name, name)  # noqa: E731  (the fitted value leads)
    return [
        CalibratorFit(method, k_shot, calibrator, {name: params[name] for name in sorted(params, key=first)})
        for (k_shot, calibrator), params in sorted(grouped.items())
    ]


def _artifact_paths(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    return {artifact.path for artifact in client.list_artifacts(run_id, path)}


def _download(
    client: MlflowClient, run_id: str, path: str, available: set[str], destination: Path
) -> Path | None:
    if path not in available:
        return None
    return Path(client.download_artifacts(run_id, path, str(destination)))


#: Plot kinds in report order, with a caption template (``{k}`` is K, ``{method}`` the method label).
_CAPTIONS: dict[str, str] = {
    "accuracy_vs_shots": "Test accuracy against K, every method (mean ± 95% CI over episodes).",
    "risk_coverage": (
        "{k}-shot risk-coverage: error rate among the most confident test queries as coverage grows "
        "(lower is better; mean over episodes)."
    ),
    "reliability": (
        "{method}, {k}-shot reliability diagram: confidence against accuracy over pooled test queries, "
        "uncalibrated and after calibration."
    ),
    "confusion": "{method}, {k}-shot confusion matrix over the novel classes, pooled over test episodes.",
    "generalised_confusion": (
        "{method}, {k}-shot generalised setting: confusion matrix over base and novel classes together."
    ),
}


def _plots(
    client: MlflowClient, run_id: str, folder: str, destination: Path, section: str, method: str | None
) -> list[ReportPlot]:
    """The PNGs under ``folder`` of a run, downloaded into ``destination`` and ordered by kind then K."""
    if folder not in _artifact_paths(client, run_id):
        return []
    pngs = [path for path in _artifact_paths(client, run_id, folder) if path.endswith(".png")]
    if not pngs:
        return []
    destination.mkdir(parents=True, exist_ok=True)
    local = Path(client.download_artifacts(run_id, folder, str(destination)))
    order = list(_CAPTIONS)

    def sort_key(path: str) -> tuple[int, str, int, str]:
        name = Path(path).name
        match = _PLOT_NAME.match(name)
        kind, k = (match["kind"], int(match["k"])) if match else (name.removesuffix(".png"), -1)
        return (order.index(kind) if kind in order else len(order), kind, k, name)

    plots = []
    for path in sorted(pngs, key=sort_key):
        name = Path(path).name
        match = _PLOT_NAME.match(name)
        kind = match["kind"] if match else name.removesuffix(".png")
        template = _CAPTIONS.get(kind)
        if template is None or ("{k}" in template and not match):
            caption = f"{method + ': ' if method else ''}{name.removesuffix('.png').replace('_', ' ')}"
        else:
            caption = template.format(k=match["k"] if match else "", method=method or "")
        plots.append(ReportPlot(section, caption, local / name))
    return plots


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
