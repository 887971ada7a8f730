"""The team tracking server (``fewshot-med tracking-server``): PostgreSQL and MLflow's basic-auth
server on 127.0.0.1, two pipeline runs logging to it at once, a read-only reviewer, and ``report``,
``evaluate --from`` and ``ui`` against its ``http://`` URI. Real processes, real database."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fewshot_med.tracking import names
from fewshot_med.tracking.server import ServerSetupError, credentials, free_port, postgres_bin

try:
    postgres_bin()
    import flask_wtf  # noqa: F401  (MLflow's basic-auth app)
    import psycopg  # noqa: F401
except (ServerSetupError, ImportError) as missing:
    pytestmark = pytest.mark.skip(reason=f"no PostgreSQL server stack here ({missing}); see .ci/run")
else:
    pytestmark = pytest.mark.slow

QUICKSTART = Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"
TINY = (
    "data.image_size=16",
    "pretrain.epochs=1",
    "pretrain.batch_size=32",
    "pretrain.steps_per_epoch=2",
    "pretrain.warmup_epochs=0",
    "meta_train.enabled=false",
    "methods=[{name: simpleshot}]",
    "episodes.shots=[1]",
    "episodes.n_test_episodes=3",
    "episodes.n_val_episodes=2",
    "evaluation.generalised=false",
    "evaluation.plots=false",
    "tracking.registered_model=null",
    "runtime.num_threads=1",
)
SETS = [arg for value in TINY for arg in ("--set", value)]
READY = "tracking server ready at"


@dataclass(frozen=True)
class TeamServer:
    url: str
    folder: Path
    secrets: dict[str, str]
    database_port: int

    def env(self, user: str) -> dict[str, str]:
        """The environment of a command signed in as ``admin`` or ``reviewer``."""
        password = self.secrets["ADMIN_PASSWORD" if user == "admin" else "REVIEWER_PASSWORD"]
        return {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "1",
            "MLFLOW_TRACKING_URI": self.url,
            "MLFLOW_TRACKING_USERNAME": user,
            "MLFLOW_TRACKING_PASSWORD": password,
        }


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def server() -> Iterator[TeamServer]:
    """The server in a folder under /tmp that PostgreSQL's account can reach (as root, PostgreSQL runs
    as ``postgres``, which cannot enter pytest's 0700 folders); stopped with SIGTERM afterwards, and
    both servers must be gone then."""
    folder = Path(tempfile.mkdtemp(prefix="fewshot-med-server-"))
    folder.chmod(0o755)
    port, database_port = free_port(), free_port()
    log = (folder / "command.log").open("w+")
    argv = [sys.executable, "-m", "fewshot_med", "tracking-server", "--folder", str(folder / "srv")]
    argv += ["--port", str(port), "--database-port", str(database_port), "--workers", "1"]
    command = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=folder)
    deadline = time.monotonic() + 240
    while READY not in (folder / "command.log").read_text() and command.poll() is None:
        assert time.monotonic() < deadline, (folder / "command.log").read_text()
        time.sleep(1)
    assert command.poll() is None, (folder / "command.log").read_text()
    yield TeamServer(f"http://127.0.0.1:{port}", folder / "srv", credentials(folder / "srv"), database_port)
    command.send_signal(signal.SIGTERM)
    command.wait(60)
    log.close()
    try:
        assert not _listening(port) and not _listening(database_port)
        assert "database system is shut down" in (folder / "srv" / "postgres.log").read_text()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _fewshot_med(*args: str, env: dict[str, str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "fewshot_med", *args],
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _finish(process: subprocess.Popen, timeout: float = 240) -> str:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output[-3000:]
    return output


@pytest.fixture(scope="module")
def two_runs(server: TeamServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A run left RUNNING by a process of this host that is gone, then two quickstart runs started at
    once; this process is signed in as the admin meanwhile."""
    from mlflow import MlflowClient

    with pytest.MonkeyPatch.context() as patch:
        for key, value in server.env("admin").items():
            if key.startswith("MLFLOW_TRACKING"):
                patch.setenv(key, value)
        client = MlflowClient(server.url)
        owner = {names.OWNER_HOST_TAG: socket.gethostname(), names.OWNER_PID_TAG: "4194303"}
        owner[names.OWNER_START_TAG] = "0@a-process-long-gone"
        left = client.create_run(client.create_experiment("left-behind"), tags=owner)
        work = tmp_path_factory.mktemp("runs")
        processes = []
        for cwd in (work / "a", work / "b"):
            cwd.mkdir()
            processes.append(_fewshot_med("run", str(QUICKSTART), *SETS, env=server.env("admin"), cwd=cwd))
        outputs = [_finish(process) for process in processes]
        run_ids = [output.rsplit("MLflow run ", 1)[1].split()[0] for output in outputs]
        yield {"client": client, "runs": run_ids, "left": left.info.run_id, "work": work}


def test_two_concurrent_runs_finish_with_metrics_and_served_artifacts(server, two_runs):
    client = two_runs["client"]
    assert len(set(two_runs["runs"])) == 2
    for run_id in two_runs["runs"]:
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        assert 0 <= run.data.metrics["test.1shot.simpleshot.accuracy"] <= 1
        assert run.info.artifact_uri.startswith("mlflow-artifacts:")
        config = Path(client.download_artifacts(run_id, names.CONFIG, str(two_runs["work"] / run_id)))
        assert "quickstart" in config.read_text()
        stored = list((server.folder / "artifacts").rglob(f"{run_id}/artifacts/{names.CONFIG}"))
        assert len(stored) == 1  # kept by the server, in its artifacts folder


def test_orphan_sweep_over_http_ends_only_the_dead_process_run(two_runs):
    client = two_runs["client"]
    left = client.get_run(two_runs["left"])
    assert left.info.status == "KILLED" and names.ORPHANED_TAG in left.data.tags
    assert all(client.get_run(run_id).info.status == "FINISHED" for run_id in two_runs["runs"])


def test_reviewer_lists_runs_but_cannot_write(server, two_runs, monkeypatch):
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "reviewer")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", server.secrets["REVIEWER_PASSWORD"])
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    reviewer = MlflowClient(server.url)
    experiment = reviewer.get_experiment_by_name("quickstart")
    found = {run.info.run_id for run in reviewer.search_runs([experiment.experiment_id])}
    assert set(two_runs["runs"]) <= found
    for write in (
        lambda: reviewer.create_run(experiment.experiment_id),
        lambda: reviewer.log_metric(two_runs["runs"][0], "tampered", 1.0),
    ):
        with pytest.raises(MlflowException) as denied:
            write()
        assert denied.value.error_code == "PERMISSION_DENIED" and "403" in str(denied.value)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "wrong")
    with pytest.raises(MlflowException, match="401"):
        MlflowClient(server.url).search_experiments()


def test_report_ui_and_evaluate_from_a_run_over_http(server, two_runs):
    run_id, work = two_runs["runs"][0], two_runs["work"]
    report = _fewshot_med("report", run_id, "--out", "report.html", env=server.env("reviewer"), cwd=work)
    ui = _fewshot_med("ui", env=server.env("reviewer"), cwd=work)
    evaluate = _fewshot_med(
        "evaluate", str(QUICKSTART), "--from", run_id, *SETS, env=server.env("admin"), cwd=work
    )
    _finish(report)
    assert run_id[:8] in (work / "report.html").read_text()
    shown = _finish(ui, timeout=60)
    experiment = two_runs["client"].get_experiment_by_name("quickstart").experiment_id
    assert f"{server.url} is a tracking server" in shown
    assert f"{server.url}/#/experiments/{experiment}/runs" in shown
    evaluated = _finish(evaluate).rsplit("MLflow run ", 1)[1].split()[0]
    run = two_runs["client"].get_run(evaluated)
    assert run.info.status == "FINISHED" and run.data.tags[names.FROM_RUN_TAG] == run_id
    assert "test.1shot.simpleshot.accuracy" in run.data.metrics
