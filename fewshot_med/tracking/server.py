"""A shared MLflow tracking server for a team: PostgreSQL keeps runs, models and users, the server
proxies the artifacts, and MLflow's ``basic-auth`` app lets the admin write and reviewers only read.

Everything lives in one server folder, kept between restarts:

- ``postgres/``: PostgreSQL's data directory (``initdb``), owned by the user PostgreSQL runs as
  (PostgreSQL refuses to run as root: as root, the ``postgres`` user, else ``nobody``);
- ``artifacts/``: what the server stores for runs (``--serve-artifacts --artifacts-destination``);
- ``basic_auth.ini``: MLflow's auth config: ``default_permission = READ``, users kept in PostgreSQL;
- ``credentials.env``: the generated passwords (mode 0600), ``KEY=value`` lines a shell can source.

PostgreSQL listens on 127.0.0.1 only (TCP, password auth, no Unix socket); MLflow binds ``host``.
See https://mlflow.org/docs/latest/self-hosting/security/basic-http-auth for the auth app.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from fewshot_med.errors import FewshotMedError
from fewshot_med.tracking._store import SERVER_STOP_SECONDS, _stop_group, tracking_uri

if TYPE_CHECKING:
    import pwd

    from fewshot_med.config import TrackingConfig

ADMIN_USER = "admin"
DATABASE_USER = "mlflow"
TRACKING_DATABASE = "mlflow"
AUTH_DATABASE = "mlflow_auth"
CREDENTIALS_FILE = "credentials.env"
#: Seconds PostgreSQL and the MLflow server each have to come up (migrations of a new database included).
START_SECONDS = 180.0
#: Seconds a worker trusts a checked password (MLflow hashes it with PBKDF2 on every request
#: otherwise: 0.9 s a request here under load, 0.09 s cached); a changed password or a deleted user
#: reaches the other workers within it.
AUTH_CACHE_SECONDS = 60
_PASSWORD_KEYS = ("ADMIN_PASSWORD", "REVIEWER_PASSWORD", "DATABASE_PASSWORD", "FLASK_SECRET_KEY")


class ServerSetupError(FewshotMedError):
    """PostgreSQL, its driver or the MLflow server cannot be set up or started here."""


@dataclass(frozen=True)
class ServerSettings:
    """Where and how the team server runs.

    Args:
        folder: the server folder (database, artifacts, auth config, credentials).
        port: port of the MLflow server.
        database_port: port of PostgreSQL on 127.0.0.1; 0 picks a free one.
        host: interface the MLflow server binds (``0.0.0.0`` exposes it to the network).
        reviewer: name of the read-only user.
        workers: MLflow server worker processes.
    """

    folder: Path
    port: int = 5000
    database_port: int = 0
    host: str = "127.0.0.1"
    reviewer: str = "reviewer"
    workers: int = 2

    @property
    def url(self) -> str:
        """The tracking URI clients set as ``MLFLOW_TRACKING_URI``."""
        return f"http://{self.host}:{self.port}"


def remote_server(settings: TrackingConfig | None = None) -> str | None:
    """The tracking URI when it is a server (``http://``, ``https://``), which serves its own UI and
    artifacts; ``None`` for a local store."""
    uri = tracking_uri(settings)
    return uri.rstrip("/") if urlparse(uri).scheme in ("http", "https") else None


def postgres_bin() -> Path:
    """The folder of PostgreSQL's server programs (``initdb``, ``postgres``): beside ``initdb`` on the
    PATH, else the newest ``/usr/lib/postgresql/<version>/bin`` (Debian's place)."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    if versions:
        return versions[-1].parent
    raise ServerSetupError(
        "PostgreSQL's server programs (initdb, postgres) are not installed: "
        "install them (Debian: apt-get install postgresql) or put their folder on the PATH"
    )


def require_driver() -> None:
    """Raise ``ServerSetupError`` when psycopg, the PostgreSQL driver MLflow connects through, is absent."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        raise ServerSetupError(
            "the PostgreSQL driver psycopg is not installed: pip install 'fewshot-med[server]'"
        ) from None


def database_account() -> pwd.struct_passwd:
    """The account PostgreSQL runs as: this one, or as root (which PostgreSQL refuses) ``postgres``,
    else ``nobody``."""
    import pwd  # POSIX only, like PostgreSQL's own accounts

    if os.geteuid() != 0:
        return pwd.getpwuid(os.geteuid())
    for name in ("postgres", "nobody"):
        with suppress(KeyError):
            return pwd.getpwnam(name)
    raise ServerSetupError("running as root, and neither a 'postgres' nor a 'nobody' account exists")


def free_port(host: str = "127.0.0.1") -> int:
    """A port on ``host`` that nothing listens on now (the kernel's choice)."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def credentials(folder: Path) -> dict[str, str]:
    """The server's passwords and secret key, read from ``folder/credentials.env``; generated and
    written (mode 0600) the first time."""
    path = folder / CREDENTIALS_FILE
    if path.is_file():
        pairs = (line.partition("=") for line in path.read_text().splitlines() if "=" in line)
        return {key.removeprefix("FEWSHOT_MED_"): value for key, _, value in pairs}
    values = {key: secrets.token_urlsafe(18) for key in _PASSWORD_KEYS}
    path.touch(mode=0o600)
    path.write_text("".join(f"FEWSHOT_MED_{key}={value}\n" for key, value in values.items()))
    return values


def database_uri(password: str, port: int, database: str) -> str:
    """SQLAlchemy URI of ``database`` on the local PostgreSQL, through psycopg 3."""
    return f"postgresql+psycopg://{DATABASE_USER}:{password}@127.0.0.1:{port}/{database}"


def start_postgres(folder: Path, port: int, password: str) -> subprocess.Popen:
    """Initialise ``folder/postgres`` on first use, start PostgreSQL on 127.0.0.1:``port`` and create
    the tracking and auth databases; returns the running ``postgres`` process (stop it with
    ``stop_postgres``)."""
    import psycopg

    programs, account = postgres_bin(), database_account()
    data = folder / "postgres"
    as_account = {"user": account.pw_uid, "group": account.pw_gid}
    if not (data / "PG_VERSION").is_file():
        _initdb(programs, data, password, account)
    reachable = subprocess.run(["test", "-w", str(data)], **as_account, check=False).returncode == 0
    if not reachable:
        raise ServerSetupError(
            f"PostgreSQL runs as {account.pw_name}, which cannot write {data}: "
            "put the server folder where that account can reach it (e.g. under /srv)"
        )
    settings = ["listen_addresses=127.0.0.1", "unix_socket_directories=", f"port={port}"]
    argv = [str(programs / "postgres"), "-D", str(data)] + [f"-c{setting}" for setting in settings]
    log = (folder / "postgres.log").open("ab")
    server = subprocess.Popen(argv, **as_account, stdout=log, stderr=log, start_new_session=True)
    deadline = time.monotonic() + START_SECONDS
    address = f"host=127.0.0.1 port={port} user={DATABASE_USER} password={password} dbname=postgres"
    while True:
        try:
            connection = psycopg.connect(address, autocommit=True, connect_timeout=5)
            break
        except psycopg.OperationalError as error:
            if server.poll() is not None or time.monotonic() > deadline:
                stop_postgres(server)
                raise ServerSetupError(
                    f"PostgreSQL did not start on 127.0.0.1:{port} ({str(error).strip()[:120]}); "
                    f"see {folder / 'postgres.log'}"
                ) from None
            time.sleep(0.5)
    with connection:
        present = {row[0] for row in connection.execute("SELECT datname FROM pg_database")}
        for database in (TRACKING_DATABASE, AUTH_DATABASE):
            if database not in present:
                connection.execute(f'CREATE DATABASE "{database}"')
    return server


def _initdb(programs: Path, data: Path, password: str, account: pwd.struct_passwd) -> None:
    """``initdb`` of ``data`` as ``account``: superuser ``mlflow`` with ``password`` (SCRAM over TCP)."""
    data.mkdir(parents=True, exist_ok=True, mode=0o700)
    password_file = data.parent / "postgres.password"
    password_file.touch(mode=0o600)
    password_file.write_text(password + "\n")
    for path in (data, password_file):
        os.chown(path, account.pw_uid, account.pw_gid)
    argv = [str(programs / "initdb"), "-D", str(data), "-U", DATABASE_USER, "-E", "UTF8"]
    argv += [f"--pwfile={password_file}", "--auth=scram-sha-256", "--no-instructions"]
    try:
        done = subprocess.run(
            argv, user=account.pw_uid, group=account.pw_gid, capture_output=True, text=True, check=False
        )
    finally:
        password_file.unlink()
    if done.returncode != 0:
        shutil.rmtree(data, ignore_errors=True)
        reason = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise ServerSetupError(f"initdb of {data} as {account.pw_name} failed: {reason}")


def stop_postgres(server: subprocess.Popen) -> None:
    """PostgreSQL's fast shutdown (SIGINT: roll back open transactions, checkpoint, exit), then SIGKILL
    after ``SERVER_STOP_SECONDS``."""
    import signal

    with suppress(ProcessLookupError):
        server.send_signal(signal.SIGINT)
    try:
        server.wait(SERVER_STOP_SECONDS)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def write_auth_config(folder: Path, database_port: int, secrets_: dict[str, str]) -> Path:
    """``folder/basic_auth.ini`` (mode 0600): every user reads by default (``default_permission =
    READ``), users live in the ``mlflow_auth`` database, the admin's first password, and checked
    passwords are cached for ``AUTH_CACHE_SECONDS``."""
    path = folder / "basic_auth.ini"
    path.touch(mode=0o600)
    auth_database = database_uri(secrets_["DATABASE_PASSWORD"], database_port, AUTH_DATABASE)
    path.write_text(
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = {auth_database}\n"
        f"admin_username = {ADMIN_USER}\n"
        f"admin_password = {secrets_['ADMIN_PASSWORD']}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        f"auth_cache_ttl_seconds = {AUTH_CACHE_SECONDS}\n"
    )
    return path


def server_command(
    settings: ServerSettings, database_port: int, secrets_: dict[str, str]
) -> tuple[list[str], dict[str, str]]:
    """The ``mlflow server`` command line with basic-auth and artifact serving, and its environment."""
    artifacts = settings.folder / "artifacts"
    artifacts.mkdir(exist_ok=True)
    store = database_uri(secrets_["DATABASE_PASSWORD"], database_port, TRACKING_DATABASE)
    argv = [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth"]
    argv += ["--backend-store-uri", store, "--serve-artifacts", "--artifacts-destination", artifacts.as_uri()]
    argv += ["--host", settings.host, "--port", str(settings.port), "--workers", str(settings.workers)]
    env = {
        **os.environ,
        "MLFLOW_AUTH_CONFIG_PATH": str(write_auth_config(settings.folder, database_port, secrets_)),
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets_["FLASK_SECRET_KEY"],
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    return argv, env


def wait_until_up(url: str, server: subprocess.Popen, log: Path) -> None:
    """Poll ``url/health`` until the server answers 200; ``ServerSetupError`` if it exits or takes
    longer than ``START_SECONDS``."""
    import requests

    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline and server.poll() is None:
        with suppress(requests.RequestException):
            if requests.get(f"{url}/health", timeout=5).status_code == 200:
                return
        time.sleep(0.5)
    lines = log.read_text(errors="replace").strip().splitlines() or ["no message"]
    raise ServerSetupError(f"the MLflow server at {url} did not come up ({lines[-1][:160]}); see {log}")


@contextmanager
def signed_in(username: str, password: str) -> Iterator[None]:
    """MLflow's client credentials (``MLFLOW_TRACKING_USERNAME``/``PASSWORD``) for the block."""
    keys = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
    before = {key: os.environ.get(key) for key in keys}
    os.environ.update(dict(zip(keys, (username, password), strict=True)))
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def ensure_reviewer(url: str, name: str, secrets_: dict[str, str]) -> None:
    """Create the read-only user ``name`` unless it exists; it keeps ``default_permission`` (READ) on
    every experiment and registered model, through MLflow's auth client (``get_app_client``)."""
    from mlflow.exceptions import RestException
    from mlflow.server import get_app_client

    with signed_in(ADMIN_USER, secrets_["ADMIN_PASSWORD"]):
        client = get_app_client("basic-auth", tracking_uri=url)
        try:
            client.get_user(name)
        except RestException as error:
            if error.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            client.create_user(name, secrets_["REVIEWER_PASSWORD"])


def run_server(settings: ServerSettings, on_ready: Callable[[dict[str, str]], None]) -> int:
    """Start PostgreSQL and the MLflow server, create the reviewer, call ``on_ready(secrets)``, and
    serve until the MLflow server exits or this process is interrupted (Ctrl-C; the CLI turns SIGTERM
    into the same); both servers are then stopped, MLflow first. Returns the MLflow server's exit
    status (1 for one ended by a signal)."""
    require_driver()
    settings.folder.mkdir(parents=True, exist_ok=True)
    secrets_ = credentials(settings.folder)
    database_port = settings.database_port or free_port()
    database = start_postgres(settings.folder, database_port, secrets_["DATABASE_PASSWORD"])
    server = None
    try:
        argv, env = server_command(settings, database_port, secrets_)
        log_path = settings.folder / "mlflow-server.log"
        with log_path.open("ab") as log:
            server = subprocess.Popen(argv, env=env, stdout=log, stderr=log, start_new_session=True)
        wait_until_up(settings.url, server, log_path)
        ensure_reviewer(settings.url, settings.reviewer, secrets_)
        on_ready(secrets_)
        status = server.wait()
        return status if status >= 0 else 1
    finally:
        if server is not None:
            _stop_group(server)
        stop_postgres(database)
