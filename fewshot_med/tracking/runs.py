"""Runs and what they hold: one parent run per pipeline, a nested run per stage or method.

Everything logs to the *current* run (the innermost ``pipeline_run``/``stage_run`` of this thread or
task), or to an explicit ``run_id``. Outside a tracked run every function here does nothing, so
pipelines call them unconditionally and ``enabled=False`` switches tracking off as a whole.

Privacy by default (``fewshot_med.privacy``, ``docs/privacy.md``): unless ``tracking.log_paths``, every
value these functions log passes the run's ``Redaction``: the config's paths become salted tokens in
params, tags, ``config.yaml`` and dataset inputs; any known path in a tag, param, text artifact or
error message becomes its token; MLflow's own context tags hold no absolute path; a dataset named after
its file or folder is logged under its path's token.

Faults: every run is tagged with its owner process (``owner_tags``), so a later command ends it KILLED
if that process dies without closing it (``end_orphaned_runs``); a store that fails mid-run ends the
command with one ``StoreError`` line (the runs stay RUNNING in a store that cannot be written, and the
next command that opens it ends them); writes that SQLite answers "database is locked" are retried.
"""

from __future__ import annotations

import functools
import json
import math
import subprocess
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from contextvars import ContextVar
from dataclasses import asdict, dataclass, is_dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from fewshot_med.errors import FewshotMedError
from fewshot_med.privacy import Redaction, is_absolute_path, is_dataset_path, looks_like_path
from fewshot_med.tracking import names
from fewshot_med.tracking._store import (
    StoreError,
    check_store_present,
    experiment_id,
    failure_reason,
    open_store,
    owner_tags,
    retrying,
    store_failures,
    tracking_uri,
)
from fewshot_med.tracking.names import metric_key

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from mlflow.data.dataset_source import DatasetSource

    from fewshot_med.config import Config, TrackingConfig
    from fewshot_med.data import MedicalImageDataset

#: Distributions whose versions tag every pipeline run (``names.version_tag``).
VERSIONED_PACKAGES = ("fewshot-med", "torch", "timm", "monai", "mlflow")
#: Leading hex characters of our SHA-256 dataset digest kept as the MLflow dataset digest (max 36).
DIGEST_CHARS = 32
_MAX_PARAM_CHARS = 6000  # MLflow's limit for a param value
_MAX_ERROR_CHARS = 1000
_METRICS_PER_CALL = 1000  # MLflow's limit of metric values per log_batch
_TRUNCATED = "…[truncated]"


@dataclass(frozen=True)
class RunHandle:
    """A run as the pipeline sees it; ``run_id`` is ``None`` when tracking is off."""

    run_id: str | None = None
    experiment_id: str | None = None


_current: ContextVar[RunHandle | None] = ContextVar("fewshot_med_current_run", default=None)
_pipeline: ContextVar[RunHandle | None] = ContextVar("fewshot_med_pipeline_run", default=None)
_redaction: ContextVar[Redaction | None] = ContextVar("fewshot_med_redaction", default=None)


def _redacting() -> Redaction:
    """The current run's redaction; outside a run, paths become tokens and no path is known."""
    return _redaction.get() or Redaction()


def _target(run_id: str | None = None) -> str | None:
    """The run to log to (``run_id``, else the current run), or ``None`` when tracking is off."""
    current = _current.get()
    if current is None or current.run_id is None:
        return None
    return run_id or current.run_id


@contextmanager
def _activate(handle: RunHandle, pipeline: bool, redaction: Redaction | None = None) -> Iterator[RunHandle]:
    """Make ``handle`` the current run (and ``redaction`` the current redaction, when given); end it
    FINISHED, FAILED (exception, its message tagged ``error`` with paths redacted) or KILLED (Ctrl-C).
    A failure of the store itself leaves as a ``StoreError`` (nothing more is written to that store)."""
    tokens: list[tuple[ContextVar[Any], Any]] = [(_current, _current.set(handle))]
    if pipeline:
        tokens.append((_pipeline, _pipeline.set(handle)))
    if redaction is not None:
        tokens.append((_redaction, _redaction.set(redaction)))
    status = "FAILED"
    try:
        yield handle
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except StoreError:
        raise
    except BaseException as error:
        reason = failure_reason(error) if handle.run_id is not None and isinstance(error, Exception) else None
        if reason is not None:
            import mlflow

            raise StoreError(mlflow.get_tracking_uri(), reason) from error
        with suppress(Exception):  # a tracking failure must not hide the error itself
            message = _redacting().text(f"{type(error).__name__}: {error}")
            set_tags({names.ERROR_TAG: message[:_MAX_ERROR_CHARS]})
        raise
    finally:
        for variable, token in reversed(tokens):
            variable.reset(token)
        if handle.run_id is not None:
            _end_run(handle.run_id, status)


def _end_run(run_id: str, status: str) -> None:
    """End the current MLflow run ``status``. A store that fails now fails a run that finished
    (``StoreError``) and is passed over for a run that ends on an error (that error is reported)."""
    import mlflow

    uri = mlflow.get_tracking_uri()
    try:
        with store_failures(uri):
            check_store_present(uri)
            try:
                mlflow.end_run(status)  # takes the run off MLflow's stack, then writes its status
            except Exception:  # written again, while SQLite answers "database is locked"
                retrying(functools.partial(mlflow.MlflowClient(uri).set_terminated, run_id, status))
    except StoreError:
        if status == "FINISHED":
            raise


@contextmanager
def pipeline_run(
    config: Config,
    run_name: str | None = None,
    tags: Mapping[str, str] | None = None,
    enabled: bool = True,
) -> Iterator[RunHandle]:
    """Open the parent run of one pipeline invocation.

    Sets the tracking URI (see ``tracking_uri``) and the experiment (``tracking.experiment``, else the
    config name), then logs the config as dotted params and as ``config.yaml``, and tags the run with
    the git commit, package versions, seed, backbone and data source. Unless ``tracking.log_paths``,
    the config's paths are logged as tokens, and the run and the runs nested in it redact (see the
    module docstring).

    Args:
        config: the validated pipeline config.
        run_name: MLflow run name; MLflow picks one when ``None``.
        tags: extra run tags.
        enabled: ``False`` (or ``config.tracking.enabled`` false) makes the run and everything
            logged inside it a no-op.

    Yields:
        The run's handle (``run_id`` ``None`` when disabled). An exception ends the run FAILED,
        ``KeyboardInterrupt`` KILLED.
    """
    if not (enabled and config.tracking.enabled):
        with _activate(RunHandle(), pipeline=True) as handle:
            yield handle
        return
    import mlflow

    uri = open_store(tracking_uri(config.tracking))
    mlflow.set_tracking_uri(uri)
    resolved = config.model_dump(mode="json")
    redaction = Redaction.for_config(resolved, config.tracking.log_paths)
    run_tags = {**_context_tags(config, redaction), **owner_tags(), **(tags or {})}
    with store_failures(uri):
        experiment = experiment_id(mlflow.MlflowClient(uri), config.tracking.experiment or config.name, uri)
        run = retrying(
            functools.partial(
                mlflow.start_run,
                experiment_id=experiment,
                run_name=run_name,
                nested=True,
                tags=_run_tags(redaction, run_tags),
            )
        )
    check_store_present(uri)  # records the database file, so that its deletion is noticed
    with _activate(RunHandle(run.info.run_id, experiment), pipeline=True, redaction=redaction) as handle:
        logged = redaction.tree(resolved)
        params = {key: redaction.text(value) for key, value in flatten_params(logged).items()}
        mlflow.log_params(params, run_id=handle.run_id)
        text = redaction.text(yaml.safe_dump(logged, sort_keys=False))
        mlflow.log_text(text, names.CONFIG, run_id=handle.run_id)
        yield handle


@contextmanager
def benchmark_run(
    name: str,
    experiment: str = "benchmarks",
    tags: Mapping[str, str] | None = None,
    settings: TrackingConfig | None = None,
) -> Iterator[RunHandle]:
    """Open the top-level run of a benchmark suite, tagged with the git commit and package versions;
    pipeline runs opened inside it (in the same experiment) nest under it.

    Args:
        name: run name (the suite).
        experiment: MLflow experiment.
        tags: extra run tags (machine, options).
        settings: which store (``tracking_uri``) and whether paths are logged (``log_paths``); the
            default store, paths as tokens, when ``None``.

    Yields:
        The run's handle; an exception ends it FAILED, ``KeyboardInterrupt`` KILLED.
    """
    import mlflow

    uri = open_store(tracking_uri(settings))
    mlflow.set_tracking_uri(uri)
    redaction = (
        Redaction.for_config({"tracking": settings.model_dump(mode="json")}, settings.log_paths)
        if settings is not None
        else Redaction()
    )
    with store_failures(uri):
        experiment_key = experiment_id(mlflow.MlflowClient(uri), experiment, uri)
        run = retrying(
            functools.partial(
                mlflow.start_run,
                experiment_id=experiment_key,
                run_name=name,
                tags=_run_tags(redaction, {**version_tags(), **owner_tags(), **(tags or {})}),
            )
        )
    with _activate(RunHandle(run.info.run_id, experiment_key), pipeline=True, redaction=redaction) as handle:
        yield handle


@contextmanager
def stage_run(
    name: str, tags: Mapping[str, str] | None = None, params: Mapping[str, Any] | None = None
) -> Iterator[RunHandle]:
    """Open a run nested in the current one, tagged ``stage=<name>``; a no-op outside a tracked run.

    Args:
        name: stage or method name (run name and ``stage`` tag; ``find_stage_run`` looks it up).
        tags: extra run tags (e.g. ``{"method": "simpleshot"}``).
        params: stage settings, logged flattened like the config (e.g. ``config.pretrain.model_dump()``).

    Yields:
        The nested run's handle. An exception ends it FAILED, ``KeyboardInterrupt`` KILLED; either
        propagates to the enclosing runs.
    """
    parent = _current.get()
    if parent is None or parent.run_id is None:
        yield RunHandle()
        return
    import mlflow

    redaction = _redacting()
    with store_failures(mlflow.get_tracking_uri()):
        run = retrying(
            functools.partial(
                mlflow.start_run,
                experiment_id=parent.experiment_id,
                run_name=name,
                nested=True,
                parent_run_id=parent.run_id,
                tags=_run_tags(redaction, {names.STAGE_TAG: name, **owner_tags(), **(tags or {})}),
            )
        )
    with _activate(RunHandle(run.info.run_id, parent.experiment_id), pipeline=False) as handle:
        if params:
            flat = flatten_params(redaction.tree(_plain(dict(params))))
            mlflow.log_params(
                {key: redaction.text(value) for key, value in flat.items()}, run_id=handle.run_id
            )
        yield handle


def pipeline_run_id() -> str | None:
    """The id of the enclosing ``pipeline_run``; ``None`` when tracking is off."""
    handle = _pipeline.get()
    return handle.run_id if handle else None


def store_uri(settings: TrackingConfig | None = None) -> str:
    """The store to read from: ``settings``' URI; without settings, the current run's, else the default.
    Opened (``open_store``) but not created."""
    if settings is None and _target() is not None:
        import mlflow

        return mlflow.get_tracking_uri()
    return open_store(tracking_uri(settings), create=False)


def find_stage_run(parent_run_id: str, stage: str, settings: TrackingConfig | None = None) -> str | None:
    """The latest FINISHED run of ``stage`` nested directly in ``parent_run_id``, or ``None``.

    Raises:
        FewshotMedError: the store holds no run ``parent_run_id``.
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    uri = store_uri(settings)
    client = MlflowClient(uri)
    try:
        parent = client.get_run(parent_run_id)
    except MlflowException:
        raise FewshotMedError(
            f"run {parent_run_id} is not in the MLflow store {uri}: pass a run id that `fewshot-med ui` "
            "lists, or point tracking.tracking_uri (or MLFLOW_TRACKING_URI) at the store that holds it"
        ) from None
    runs = client.search_runs(
        [parent.info.experiment_id],
        filter_string=(
            f"tags.{names.PARENT_RUN_TAG} = '{parent_run_id}' and tags.{names.STAGE_TAG} = '{stage}' "
            "and attributes.status = 'FINISHED'"
        ),
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def download_stage_artifact(
    run_id: str, stage: str, artifact_path: str, destination: Path, settings: TrackingConfig | None = None
) -> Path | None:
    """Download a file that the ``stage`` run of pipeline run ``run_id`` (or ``run_id`` itself, a stage
    run) logged, e.g. an evaluate run's ``episodes/test_5shot.json``, into ``destination``; ``None`` if
    there is no such file."""
    from mlflow import MlflowClient

    stage_run_id = find_stage_run(run_id, stage, settings) or run_id
    client = MlflowClient(store_uri(settings))
    folder, _, name = artifact_path.rpartition("/")
    if name not in {Path(info.path).name for info in client.list_artifacts(stage_run_id, folder or None)}:
        return None
    destination.mkdir(parents=True, exist_ok=True)
    return Path(client.download_artifacts(stage_run_id, artifact_path, str(destination)))


def continue_interrupted_run(interrupted_run_id: str, up_to_step: int, run_id: str | None = None) -> None:
    """Link the current run (a stage that resumed a checkpoint) to the ``interrupted_run_id`` that wrote
    the checkpoint: tag it ``resumed_from`` (and its pipeline run with the interrupted pipeline run),
    and copy the interrupted run's metric history up to step ``up_to_step`` (the checkpoint's) into it,
    so one run shows the whole curve. An interrupted run that is not in this store is only named.

    MLflow logs at most 1000 metric values per call, so a long history takes several calls.
    """
    target = _target(run_id)
    if target is None:
        return
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    set_tags({names.RESUMED_FROM_TAG: interrupted_run_id}, run_id=target)
    client = MlflowClient()
    try:
        interrupted = client.get_run(interrupted_run_id)
    except MlflowException as error:
        if error.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        return
    parent, pipeline = interrupted.data.tags.get(names.PARENT_RUN_TAG), pipeline_run_id()
    if parent is not None and pipeline not in (None, target):
        set_tags({names.RESUMED_FROM_TAG: parent}, run_id=pipeline)
    history = [
        metric
        for key in interrupted.data.metrics
        for metric in client.get_metric_history(interrupted_run_id, key)
        if metric.step <= up_to_step
    ]
    for start in range(0, len(history), _METRICS_PER_CALL):
        chunk = history[start : start + _METRICS_PER_CALL]
        retrying(functools.partial(client.log_batch, target, metrics=chunk))


def log_metrics(metrics: Mapping[str, Any], step: int | None = None, run_id: str | None = None) -> None:
    """Log metrics in one batched call; ``None`` values are skipped, NaN is recorded as NaN.

    Keys are sanitised to MLflow's alphabet (other characters become ``_``); values may be Python,
    NumPy or one-element torch numbers. Fits the training loops' ``log_metrics(metrics, step)`` callback.
    """
    target = _target(run_id)
    values = {metric_key(key): float(value) for key, value in metrics.items() if value is not None}
    if target is None or not values:
        return
    import mlflow

    check_store_present(mlflow.get_tracking_uri())
    retrying(functools.partial(mlflow.log_metrics, values, step=step, run_id=target))


def stage_metrics_logger(stage: str) -> Callable[[Mapping[str, Any], int], None]:
    """The training loops' ``log_metrics(metrics, step)`` callback for ``stage``: it logs each record
    field under ``names.stage_metric(stage, field)`` (``pretrain.train_loss``) to the current run."""

    def log(metrics: Mapping[str, Any], step: int) -> None:
        log_metrics({names.stage_metric(stage, key): value for key, value in metrics.items()}, step)

    return log


def summary_metrics(
    summary: Mapping[str, tuple[float, float]], key: Callable[[str], str]
) -> dict[str, float]:
    """``{metric: (mean, ci95)}`` as ``{key(metric): mean, key(<metric>_ci95): ci95}``, e.g. with
    ``key = functools.partial(names.test_metric, 5, "protonet", "none")``."""
    metrics: dict[str, float] = {}
    for name, (mean, ci95) in summary.items():
        metrics[key(name)] = mean
        metrics[key(names.ci95(name))] = ci95
    return metrics


def log_params(params: Mapping[str, Any], run_id: str | None = None) -> None:
    """Log params in one batched call (values become strings, known paths tokens; a param, once logged,
    never changes)."""
    target = _target(run_id)
    if target is None or not params:
        return
    import mlflow

    text = _redacting().text
    values = {key: text(str(value)) for key, value in params.items()}
    retrying(functools.partial(mlflow.log_params, values, run_id=target))


def set_tags(tags: Mapping[str, Any], run_id: str | None = None) -> None:
    """Set run tags (values become strings, known paths tokens)."""
    target = _target(run_id)
    if target is None or not tags:
        return
    from mlflow import MlflowClient
    from mlflow.entities import RunTag

    text = _redacting().text
    batch = [RunTag(key, text(str(value))) for key, value in tags.items()]
    retrying(functools.partial(MlflowClient().log_batch, target, tags=batch))


def redact_text(text: str) -> str:
    """``text`` as the current run may log it: its known paths as tokens (``Redaction.text``); for
    text that reaches MLflow outside these functions (model registry descriptions, model cards)."""
    return _redacting().text(text)


def logged_dataset_name(dataset: MedicalImageDataset) -> str:
    """The dataset's name as the current run logs it (``data.name``, dataset inputs, descriptions):
    as is for the catalogue, the demo, MedMNIST, a dataset without a local source, or with
    ``log_paths``; the token of its source when the name was taken from a file or folder name."""
    redaction = _redacting()
    if redaction.log_paths or not _is_local(dataset.source) or not is_dataset_path(dataset.name):
        return dataset.name  # a catalogue name or the demo
    spec = redaction.data_source or ""
    if spec.startswith("medmnist:") and dataset.name.startswith(
        spec.removeprefix("medmnist:").partition("@")[0]
    ):
        return dataset.name  # the MedMNIST cache file of the run's own spec, named by its flag
    return redaction.path(dataset.source)


def model_tags() -> dict[str, str]:
    """MLflow's context tags (user, source program, git) as the current run may log them, for
    ``log_model(tags=…)``: MLflow otherwise tags a logged model with the program's absolute path."""
    from mlflow.tracking.context.registry import resolve_tags

    return _run_tags(_redacting(), resolve_tags())


def log_dict_artifact(obj: Any, artifact_file: str, run_id: str | None = None) -> None:
    """Log a JSON (or ``.yaml``/``.yml``) artifact.

    NumPy and torch values, tuples and dataclasses (e.g. an ``EpisodeList``) are converted; NaN and
    infinities become ``null`` so the file stays valid JSON.
    """
    target = _target(run_id)
    if target is None:
        return
    import mlflow

    plain = _plain(obj)
    if artifact_file.endswith((".yaml", ".yml")):
        text = yaml.safe_dump(plain, sort_keys=False)
    else:
        text = json.dumps(plain, indent=1, allow_nan=False)
    mlflow.log_text(_redacting().text(text), artifact_file, run_id=target)


def log_text_artifact(text: str, artifact_file: str, run_id: str | None = None) -> None:
    """Log text (markdown, CSV, …) as an artifact file of the run (known paths as tokens)."""
    target = _target(run_id)
    if target is None:
        return
    import mlflow

    mlflow.log_text(_redacting().text(text), artifact_file, run_id=target)


def log_figure(figure: Figure, artifact_file: str, run_id: str | None = None) -> None:
    """Log a matplotlib figure as an image artifact (e.g. ``plots/reliability_5shot.png``), then
    release it."""
    target = _target(run_id)
    if target is not None:
        from mlflow import MlflowClient

        MlflowClient().log_figure(target, figure, artifact_file)
    figure.clear()


def log_dataset_input(
    dataset: MedicalImageDataset,
    context: str,
    split: str,
    classes: Sequence[str] | None = None,
    run_id: str | None = None,
) -> None:
    """Record one split of ``dataset`` as an ``mlflow.data`` input of the run (lineage).

    The MLflow dataset is named ``<dataset>.<split>`` (``logged_dataset_name``), carries the leading
    ``DIGEST_CHARS`` characters of our content digest (MLflow allows 36), the source (a local
    file/folder, as its token unless ``log_paths``; an URL; or the generator spec) and the split's
    image/label schema. The full digest is also tagged ``data.digest`` on the run and on the pipeline
    run. Patient ids (``Split.groups``) and file names are never logged; the digest is a SHA-256 of the
    content, so it cannot be turned back into them.

    Args:
        dataset: the loaded dataset.
        context: what the run does with it, e.g. ``training``, ``validation``, ``evaluation``.
        split: ``train``, ``val`` or ``test``.
        classes: the classes of the split actually used (input tag), when not all of them.
        run_id: log to this run instead of the current one.
    """
    target = _target(run_id)
    if target is None:
        return
    import mlflow
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    part = dataset.splits[split]
    name = logged_dataset_name(dataset)
    logged = mlflow.data.from_numpy(
        features=part.images,
        targets=part.labels,
        source=_dataset_source(dataset.source, _redacting()),
        name=names.dataset_input_name(name, split),
        digest=dataset.digest[:DIGEST_CHARS],
    )
    input_tags = {MLFLOW_DATASET_CONTEXT: context, names.INPUT_SPLIT_TAG: split}
    if classes is not None:
        input_tags[names.INPUT_CLASSES_TAG] = json.dumps(list(classes))
    text = _redacting().text
    entity = DatasetInput(logged._to_mlflow_entity(), [InputTag(k, text(v)) for k, v in input_tags.items()])
    retrying(functools.partial(mlflow.MlflowClient().log_inputs, target, datasets=[entity]))
    data_tags = {names.DATA_DIGEST_TAG: dataset.digest, names.DATA_NAME_TAG: name}
    for run in {target, pipeline_run_id() or target}:
        set_tags(data_tags, run_id=run)


def _is_local(source: str) -> bool:
    """Whether a dataset's ``source`` is a file or folder of this machine."""
    return looks_like_path(source) or is_absolute_path(source) or Path(source).exists()


def _dataset_source(source: str, redaction: Redaction) -> DatasetSource:
    """An MLflow dataset source: a URL, a local path (its token unless ``log_paths``), or else the spec
    string as code."""
    from mlflow.data.sources import CodeDatasetSource, HTTPDatasetSource, LocalArtifactDatasetSource

    if source.startswith(("http://", "https://")):
        return HTTPDatasetSource(source)
    if _is_local(source):
        return LocalArtifactDatasetSource(redaction.path(Path(source).expanduser().resolve().as_posix()))
    return CodeDatasetSource({"fewshot_med.source": source})


def flatten_params(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mappings as ``{"a.b.c": value}``: strings as is, other values as JSON, long ones truncated."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, f"{name}."))
            continue
        text = value if isinstance(value, str) else json.dumps(_plain(value))
        if len(text) > _MAX_PARAM_CHARS:
            text = text[: _MAX_PARAM_CHARS - len(_TRUNCATED)] + _TRUNCATED
        flat[name] = text
    return flat


def _plain(obj: Any) -> Any:
    """JSON-ready builtins: dataclasses, NumPy/torch values and tuples converted, non-finite floats None."""
    if is_dataclass(obj) and not isinstance(obj, type):
        return _plain(asdict(obj))
    if isinstance(obj, Mapping):
        return {str(key): _plain(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(value) for value in obj]
    if hasattr(obj, "tolist"):  # NumPy arrays and scalars, torch tensors
        return _plain(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _context_tags(config: Config, redaction: Redaction) -> dict[str, str]:
    """Tags that make a run reproducible: code version, package versions, seed, backbone, data source
    (a path as its token)."""
    return {
        names.SEED_TAG: str(config.seed),
        names.BACKBONE_TAG: config.model.backbone,
        names.DATA_SOURCE_TAG: redaction.source(config.data.source),
        **version_tags(),
    }


def _run_tags(redaction: Redaction, tags: Mapping[str, str]) -> dict[str, str]:
    """``tags`` over MLflow's own context tags (``mlflow.user``, ``mlflow.source.name``, git), as
    ``mlflow.start_run`` would set them, redacted: the source program's path (``sys.argv[0]``), any
    other absolute path and any known path become tokens. ``mlflow.start_run`` keeps the given values."""
    from mlflow.tracking.context.registry import resolve_tags
    from mlflow.utils.mlflow_tags import MLFLOW_SOURCE_NAME

    def redact(key: str, value: str) -> str:
        if (key == MLFLOW_SOURCE_NAME and looks_like_path(value)) or is_absolute_path(value):
            return redaction.path(value)
        return redaction.text(value)

    return {key: redact(key, str(value)) for key, value in resolve_tags(dict(tags)).items()}


def version_tags() -> dict[str, str]:
    """The git commit (``git_commit``, ``git_dirty``) and ``version.<package>`` of ``VERSIONED_PACKAGES``."""
    tags = _git_tags()
    for package in VERSIONED_PACKAGES:
        try:
            tags[names.version_tag(package)] = metadata.version(package)
        except metadata.PackageNotFoundError:
            tags[names.version_tag(package)] = "not installed"
    return tags


def _git_tags() -> dict[str, str]:
    """``git_commit`` (and ``git_dirty``) of the checkout holding this package; ``unknown`` outside one."""
    package_dir = Path(__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", "-C", str(package_dir), *args], capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {names.GIT_COMMIT_TAG: "unknown"}
    status = git("status", "--porcelain", "--untracked-files=no")
    dirty = "unknown" if status is None else str(bool(status)).lower()
    return {names.GIT_COMMIT_TAG: commit, names.GIT_DIRTY_TAG: dirty}
