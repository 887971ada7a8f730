"""Where runs are kept, and how the store is opened: the tracking URI, the experiment, the ``mlflow ui``
command line, the owner of a run, runs left behind by dead processes, and store failures.

The default store is one folder, ``./mlruns``: the SQLite database ``mlruns/mlflow.db`` and the
artifacts under ``mlruns/artifacts/<experiment>/``. Any SQLite file store keeps its artifacts in an
``artifacts`` folder beside the database; other stores (a server, another database) decide themselves.

Every command opens a store through ``open_store``: it creates a SQLite store's folder, keeps
SQLAlchemy's and MLflow's database logging from flooding the terminal, and ends the runs that a dead
process of this host left RUNNING (``end_orphaned_runs``). A store that fails mid-command (turned
read-only, deleted, a server not answering) becomes one ``StoreError`` line; calls that lose a race
with another writer (SQLite's "database is locked", two runs inserting the same dataset row at once)
are retried a bounded number of times (``retrying``); MLflow's HTTP client
retries a server by itself (``MLFLOW_HTTP_REQUEST_*``, bounded in ``fewshot_med.tracking``).
"""

from __future__ import annotations

import logging
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import urlparse

from fewshot_med.errors import FewshotMedError
from fewshot_med.tracking import names

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run

    from fewshot_med.config import TrackingConfig

T = TypeVar("T")

DEFAULT_STORE_DIR = "mlruns"
DB_FILE = "mlflow.db"
ARTIFACTS_DIR = "artifacts"
_SQLITE_PREFIX = "sqlite:///"
#: Attempts of a store call that loses a race (``RACE_REASONS``), and the wait before the second
#: attempt (doubled before each further one).
LOCKED_ATTEMPTS = 4
LOCKED_FIRST_WAIT = 0.5
#: What a store answers when a write loses a race with another writer; the same call, tried again,
#: succeeds: SQLite's write lock held beyond its own 5 s busy wait, and a row that another run inserted
#: between MLflow's lookup and its insert (two runs logging the same dataset input to one server:
#: PostgreSQL's unique violation, or SQLite's).
RACE_REASONS = (
    "database is locked",
    "duplicate key value violates unique constraint",
    "UNIQUE constraint failed",
)
_MAX_REASON_CHARS = 200
_opened: set[str] = set()  # stores this process has opened (and swept) already
_identities: dict[str, tuple[int, int]] = {}  # absolute database path -> its (device, inode)


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


def check_port(host: str, port: int) -> None:
    """Raise ``FewshotMedError`` (one line) when ``port`` on ``host`` cannot be bound: taken by another
    server, or a privileged port. Tested by binding it the way a server does (address reuse on)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as error:
        raise FewshotMedError(
            f"cannot serve on {host}:{port} ({error.strerror or error}); pick another port with --port"
        ) from None


#: Seconds a server has to stop after SIGTERM before its process group is killed.
SERVER_STOP_SECONDS = 10.0


def serve(argv: list[str], env: dict[str, str]) -> int:
    """Run a server command (``ui_command``) in a process group of its own until it exits; returns its
    exit status (1 for one ended by a signal). However it ends (the server exits, Ctrl-C, or SIGTERM
    turned into ``KeyboardInterrupt`` by the CLI, which then propagates), the whole group, the server
    and the workers it spawned, is taken down (``_stop_group``)."""
    server = subprocess.Popen(argv, env=env, start_new_session=True)
    try:
        status = server.wait()
    finally:
        _stop_group(server)
    return status if status >= 0 else 1


def _stop_group(server: subprocess.Popen) -> None:
    """SIGTERM to the server's process group, then, once the server is gone or after
    ``SERVER_STOP_SECONDS``, SIGKILL to whatever is left of the group."""
    import signal

    with suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGTERM)
    with suppress(subprocess.TimeoutExpired):
        server.wait(SERVER_STOP_SECONDS)
    with suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGKILL)
    server.wait()


def initialise_store(uri: str) -> None:
    """Create the store at ``uri`` now (a SQLite store runs its schema migrations once, on first use)."""
    from mlflow import MlflowClient

    open_store(uri)
    with store_failures(uri):
        MlflowClient(uri).search_experiments()


def open_store(uri: str, create: bool = True) -> str:
    """Open the store at ``uri`` for this command and return ``uri``.

    Creates a SQLite store's folder (``create``; a reader passes ``False`` and an absent database stays
    absent), quiets the database loggers (``quiet_store_logs``) and, the first time this process opens
    the store, ends the runs that dead processes of this host left RUNNING (``end_orphaned_runs``).
    """
    if create:
        prepare_store(uri)
    quiet_store_logs()
    database = sqlite_path(uri)
    if uri not in _opened and (database is None or database.is_file()):
        _opened.add(uri)
        end_orphaned_runs(uri)
    return uri


def quiet_store_logs() -> None:
    """Keep a failing database from flooding the terminal: MLflow logs every SQLAlchemy error with its
    traceback before raising it (the raised error is what the command reports), and SQLAlchemy's and
    Alembic's loggers, unless configured, print only errors."""
    store_logger = logging.getLogger("mlflow.store.db.utils")
    if not any(isinstance(f, _RaisedAnyway) for f in store_logger.filters):
        store_logger.addFilter(_RaisedAnyway())
    for name in ("sqlalchemy", "alembic"):
        library = logging.getLogger(name)
        if library.level == logging.NOTSET:
            library.setLevel(logging.ERROR)


class _RaisedAnyway(logging.Filter):
    """Drops log records that carry an exception: MLflow's database layer raises it right after."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.exc_info is None


# --- owners of runs and runs left RUNNING ---------------------------------------------------------


def process_start(pid: int) -> str | None:
    """When process ``pid`` of this host started, as an opaque string that differs between two
    processes given the same pid; ``None`` when there is no such process (or no way to tell).

    On Linux the start in clock ticks since boot plus the boot's id (``/proc``), elsewhere ``ps``'s
    start time.
    """
    stat = Path(f"/proc/{pid}/stat")
    if Path("/proc/self/stat").is_file():
        try:
            fields = stat.read_text().rpartition(")")[2].split()
            boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        except OSError:
            return None
        return f"{fields[19]}@{boot}"  # field 22 of /proc/<pid>/stat; the split starts at field 3
    try:
        done = subprocess.run(["ps", "-o", "lstart=", "-p", str(pid)], capture_output=True, text=True)
    except OSError:
        return None
    return done.stdout.strip() or None


def owner_tags() -> dict[str, str]:
    """The tags that name this process as a run's owner (host, pid, process start); empty where the
    start of a process cannot be told, so such runs are never taken for orphans."""
    start = process_start(os.getpid())
    if start is None:
        return {}
    return {
        names.OWNER_HOST_TAG: socket.gethostname(),
        names.OWNER_PID_TAG: str(os.getpid()),
        names.OWNER_START_TAG: start,
    }


def end_orphaned_runs(uri: str) -> list[str]:
    """End KILLED the RUNNING runs in ``uri`` whose owner was a process of this host that is gone
    (``kill -9``, a crash, a lost node), each tagged ``orphaned`` with who ended it and when; returns
    their ids.

    A run is left alone when its owner tags name another host (this host cannot tell whether that
    process lives), when it has no owner tags (runs of other tools or older versions), or when its
    process still runs with the same start time. A store that cannot be read or written now is
    reported on one stderr line and left as it is.
    """
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    if not owner_tags():
        return []
    host = socket.gethostname()
    client = MlflowClient(uri)
    ended = []
    try:
        experiments = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
        query = f"attributes.status = 'RUNNING' and tags.`{names.OWNER_HOST_TAG}` = '{host}'"
        for run in _all_runs(client, experiments, query):
            tags = run.data.tags
            pid = tags.get(names.OWNER_PID_TAG, "")
            if not pid.isdigit() or process_start(int(pid)) == tags.get(names.OWNER_START_TAG):
                continue
            found = f"found by {_command()} at {datetime.now().astimezone().isoformat(timespec='seconds')}"
            reason = f"process {pid} on host {host} ended without closing the run; {found}"
            client.set_tag(run.info.run_id, names.ORPHANED_TAG, reason)
            client.set_terminated(run.info.run_id, "KILLED")
            ended.append(run.info.run_id)
    except Exception as error:  # a store that fails now fails the command's own calls next, or not at all
        warning = f"warning: could not end runs of ended processes in {uri}: {_first_line(error)}"
        print(warning, file=sys.stderr)
    return ended


def _all_runs(client: MlflowClient, experiments: list[str], query: str) -> Iterator[Run]:
    """Every run of ``experiments`` that matches ``query``, page by page."""
    token = None
    while experiments:
        page = client.search_runs(experiments, query, page_token=token)
        yield from page
        token = page.token
        if not token:
            return


def _command() -> str:
    """This process as a reader knows it: the program and its first word (``fewshot-med report``) and
    the pid."""
    program = Path(sys.argv[0]).name or "python"
    if program == "__main__.py":
        program = f"python -m {Path(sys.argv[0]).parent.name}"
    words = [word for word in sys.argv[1:] if not word.startswith("-")][:1]
    return f"{' '.join([program, *words])} (pid {os.getpid()})"


# --- failures -------------------------------------------------------------------------------------


class StoreError(FewshotMedError):
    """The tracking store failed mid-command: it turned read-only, was deleted, or its server stopped
    answering. One line naming the store, the reason and, when a training checkpoint survives it,
    that checkpoint and ``--resume``."""

    def __init__(self, uri: str, reason: str, checkpoint: Path | None = None) -> None:
        self.uri, self.reason, self.checkpoint = uri, reason, checkpoint
        if checkpoint is not None and checkpoint.is_file():
            advice = f"the checkpoint {checkpoint} is intact: fix the store and rerun with --resume"
        else:
            advice = "fix the store (or point tracking.tracking_uri elsewhere) and rerun"
        super().__init__(f"tracking store {uri} failed ({reason}); {advice}")

    def keeping(self, checkpoint: Path) -> StoreError:
        """The same failure, saying that ``checkpoint`` survives it."""
        return StoreError(self.uri, self.reason, checkpoint)


def failure_reason(error: BaseException) -> str | None:
    """Why the store failed, when ``error`` (or an error it came from) is the store failing: a database
    that cannot be opened or written, a server that does not answer or answers 5xx; ``None`` for
    other errors (a bad request, a missing run)."""
    from mlflow.exceptions import MlflowException

    chain: list[BaseException] = []
    link: BaseException | None = error
    while link is not None and link not in chain:
        chain.append(link)
        link = link.__cause__ or link.__context__
    for link in chain:
        if _is_database_error(link):
            return _first_line(getattr(link, "orig", None) or link)
        if type(link).__module__.startswith(("requests", "urllib3")):
            return f"the server does not answer: {_first_line(link)}"
    for link in chain:  # a server that answered, with an error of its own
        is_request = isinstance(link, MlflowException) and str(link.message).startswith("API request to")
        if is_request and link.get_http_status_code() >= 500:
            return _first_line(link)
    return None


def _is_database_error(error: BaseException) -> bool:
    """An SQLite or SQLAlchemy operational error (cannot open, read-only, I/O error, locked, gone)."""
    import sqlite3

    if isinstance(error, sqlite3.OperationalError):
        return True
    sqlalchemy = sys.modules.get("sqlalchemy.exc")
    return sqlalchemy is not None and isinstance(error, sqlalchemy.OperationalError)


def _first_line(error: BaseException) -> str:
    """An error's message as one short line."""
    lines = str(error).strip().splitlines() or [type(error).__name__]
    return lines[0][:_MAX_REASON_CHARS]


@contextmanager
def store_failures(uri: str) -> Iterator[None]:
    """Turn a failure of the store at ``uri`` inside the block into a one-line ``StoreError``."""
    try:
        yield
    except StoreError:
        raise
    except Exception as error:
        reason = failure_reason(error)
        if reason is None:
            raise
        raise StoreError(uri, reason) from error


def check_store_present(uri: str) -> None:
    """Raise ``StoreError`` when the SQLite database of ``uri`` was deleted or replaced since this
    process first saw it: SQLite would go on writing to the unlinked file, and everything logged from
    then on would be lost without an error. The first call records the file; other stores pass."""
    database = sqlite_path(uri)
    if database is None:
        return
    key = os.path.abspath(database)  # a relative URI names another file after a change of directory
    try:
        status = database.stat()
    except FileNotFoundError:
        if key in _identities:
            raise StoreError(uri, f"its database {database} was deleted") from None
        return
    identity = (status.st_dev, status.st_ino)
    if _identities.setdefault(key, identity) != identity:
        raise StoreError(uri, f"its database {database} was replaced by another file")


def retrying(call: Callable[[], T]) -> T:
    """``call()``, tried again up to ``LOCKED_ATTEMPTS`` times in all, with doubling waits, while it
    loses a race with another writer (``RACE_REASONS``)."""
    for attempt in range(LOCKED_ATTEMPTS - 1):
        try:
            return call()
        except Exception as error:
            text = f"{failure_reason(error) or ''} {error}"
            if not any(reason in text for reason in RACE_REASONS):
                raise
        time.sleep(LOCKED_FIRST_WAIT * 2**attempt)
    return call()


def experiment_pages(base_url: str, settings: TrackingConfig | None = None) -> list[tuple[str, str]]:
    """``(name, url)`` of the runs table of every experiment in the store that holds runs.

    MLflow 3's UI opens an experiment on its GenAI overview unless the URL selects the runs (it does
    not read the ``mlflow.experimentKind`` tag for that), so these are the links to follow.
    """
    from mlflow import MlflowClient

    uri = open_store(tracking_uri(settings), create=False)
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
