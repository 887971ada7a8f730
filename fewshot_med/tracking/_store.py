"""Where runs are kept: the tracking URI, the experiment, and the ``mlflow ui`` command line.

The default store is one folder, ``./mlruns``: the SQLite database ``mlruns/mlflow.db`` and the
artifacts under ``mlruns/artifacts/<experiment>/``. Any SQLite file store keeps its artifacts in an
``artifacts`` folder beside the database; other stores (a server, another database) decide themselves.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from fewshot_med.errors import FewshotMedError
from fewshot_med.tracking import names

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from fewshot_med.config import TrackingConfig

DEFAULT_STORE_DIR = "mlruns"
DB_FILE = "mlflow.db"
ARTIFACTS_DIR = "artifacts"
_SQLITE_PREFIX = "sqlite:///"


def tracking_uri(settings: TrackingConfig | None = None) -> str:
    """The tracking URI: ``settings.tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else ``./mlruns``.

    A value without a URI scheme is a store folder (``<folder>/mlflow.db`` plus
    ``<folder>/artifacts``); relative folders and SQLite paths are made absolute from the current
    directory. Other URIs (``http://…``, ``postgresql://…``, ``file:…``) are passed to MLflow as given.
    """
    value = (settings.tracking_uri if settings else None) or os.environ.get("MLFLOW_TRACKING_URI")
    value = value or DEFAULT_STORE_DIR
    if _is_folder(value):
        return _SQLITE_PREFIX + (Path(value).expanduser().resolve() / DB_FILE).as_posix()
    database = sqlite_path(value)
    if database is not None:
        _, _, query = value.partition("?")
        return _SQLITE_PREFIX + database.as_posix() + (f"?{query}" if query else "")
    return value


def _is_folder(value: str) -> bool:
    """A plain path (``mlruns``, ``/data/runs``, ``C:\\runs``), not a URI nor a Databricks profile."""
    scheme = urlparse(value).scheme
    return (not scheme or len(scheme) == 1) and not value.startswith("databricks")


def sqlite_path(uri: str) -> Path | None:
    """The absolute database file of a ``sqlite:///`` URI; ``None`` for other URIs and in-memory ones."""
    if not uri.startswith(_SQLITE_PREFIX):
        return None
    path = uri[len(_SQLITE_PREFIX) :].partition("?")[0]
    if path in ("", ":memory:"):
        return None
    return Path(path).expanduser().resolve()


def artifact_root(uri: str) -> Path | None:
    """The artifact folder kept beside a SQLite database; ``None`` when the store decides itself."""
    database = sqlite_path(uri)
    return database.parent / ARTIFACTS_DIR if database else None


def prepare_store(uri: str) -> None:
    """Create the folder of a SQLite database (SQLite creates the file, not its folder)."""
    database = sqlite_path(uri)
    if database is not None:
        database.parent.mkdir(parents=True, exist_ok=True)


def experiment_id(client: MlflowClient, name: str, uri: str) -> str:
    """The id of experiment ``name``, created on first use with its artifacts beside a SQLite store.

    The experiment carries MLflow's ``mlflow.experimentKind`` tag, ``custom_model_development`` (set on
    an existing experiment that has no kind yet), so the MLflow UI opens it on its runs rather than on
    the GenAI overview.
    """
    from mlflow.exceptions import MlflowException

    kind = {names.EXPERIMENT_KIND_TAG: names.EXPERIMENT_KIND}
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        root = artifact_root(uri)
        slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "experiment"
        location = (root / slug).as_uri() if root else None
        try:
            return client.create_experiment(name, artifact_location=location, tags=kind)
        except MlflowException as error:  # created meanwhile by a concurrent run
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            experiment = client.get_experiment_by_name(name)
    if experiment.lifecycle_stage == "deleted":
        raise FewshotMedError(
            f"MLflow experiment '{name}' is deleted in {uri}; restore it with "
            f"'mlflow experiments restore --experiment-id {experiment.experiment_id}' "
            "or set tracking.experiment to another name"
        )
    if names.EXPERIMENT_KIND_TAG not in experiment.tags:
        client.set_experiment_tag(experiment.experiment_id, names.EXPERIMENT_KIND_TAG, names.EXPERIMENT_KIND)
    return experiment.experiment_id


def ui_command(
    port: int = 5000, host: str = "127.0.0.1", settings: TrackingConfig | None = None
) -> tuple[list[str], dict[str, str]]:
    """The ``mlflow ui`` command line for the local store, and the environment to run it in.

    Args:
        port: port to serve on.
        host: interface to bind (``0.0.0.0`` exposes it to the network).
        settings: the tracking section of a config; the default store when ``None``.

    Returns:
        ``(argv, env)`` for ``subprocess.run(argv, env=env)``: ``env`` is the current environment
        plus ``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false`` (no job runner: starts faster, less memory).
    """
    uri = tracking_uri(settings)
    if urlparse(uri).scheme in ("http", "https", "databricks"):
        raise FewshotMedError(f"the tracking URI {uri} is already a server; open it in a browser instead")
    argv = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri]
    argv += ["--host", host, "--port", str(port)]
    root = artifact_root(uri)
    if root is not None:
        argv += ["--default-artifact-root", root.as_uri(), "--artifacts-destination", root.as_uri()]
    return argv, {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def initialise_store(uri: str) -> None:
    """Create the store at ``uri`` now (a SQLite store runs its schema migrations once, on first use)."""
    from mlflow import MlflowClient

    prepare_store(uri)
    MlflowClient(uri).search_experiments()


def experiment_pages(base_url: str, settings: TrackingConfig | None = None) -> list[tuple[str, str]]:
    """``(name, url)`` of the runs table of every experiment in the store that holds runs.

    MLflow 3's UI opens an experiment on its GenAI overview unless the URL selects the runs (it does
    not read the ``mlflow.experimentKind`` tag for that), so these are the links to follow.
    """
    from mlflow import MlflowClient

    uri = tracking_uri(settings)
    database = sqlite_path(uri)
    if database is not None and not database.is_file():
        return []
    client = MlflowClient(uri)
    pages = []
    for experiment in client.search_experiments(order_by=["name ASC"]):
        if client.search_runs([experiment.experiment_id], max_results=1):
            route = f"#/experiments/{experiment.experiment_id}/runs?workflowType=machine_learning"
            pages.append((experiment.name, f"{base_url.rstrip('/')}/{route}"))
    return pages


@contextmanager
def using_store(uri: str) -> Iterator[None]:
    """Point MLflow's global tracking URI at ``uri`` for the block, then restore it (and
    ``$MLFLOW_TRACKING_URI``): ``runs:/`` model URIs resolve through the global URI, not through a
    ``tracking_uri`` argument, so loading outside a pipeline run would otherwise read (and create)
    ``./mlflow.db`` of the working directory."""
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    environment = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        with _use_tracking_uri(uri):
            yield
    finally:
        if environment is not None:
            os.environ["MLFLOW_TRACKING_URI"] = environment
