"""Runs of a process killed with SIGKILL: the next command ends them KILLED, and ``--resume`` links the new
runs to them and carries their metric history."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from fewshot_med.tracking import names
from fewshot_med.tracking._store import end_orphaned_runs, owner_tags, process_start

EPOCHS = 8
LOSS = names.stage_metric(names.PRETRAIN, "train_loss")


def fewshot_med(*args: str, cwd: Path) -> subprocess.Popen:
    """``python -m fewshot_med ARGS`` in ``cwd`` with a small, quiet environment."""
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    command = [sys.executable, "-m", "fewshot_med", *args]
    return subprocess.Popen(
        command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def tiny_pretraining(folder: Path, tiny_pipeline: dict, empty_store: Path) -> MlflowClient:
    """``tiny.yaml`` (pretraining of ``EPOCHS`` short epochs, never stopping early) and a migrated store
    ``mlruns/mlflow.db`` in ``folder``; returns a client of that store."""
    pretrain = {"epochs": EPOCHS, "batch_size": 32, "steps_per_epoch": 3, "early_stopping_patience": None}
    (folder / "tiny.yaml").write_text(yaml.safe_dump({**tiny_pipeline, "pretrain": pretrain}))
    (folder / "mlruns").mkdir()
    shutil.copy(empty_store, folder / "mlruns" / "mlflow.db")
    return MlflowClient(f"sqlite:///{folder}/mlruns/mlflow.db")


def wait_for_metric(client: MlflowClient, process: subprocess.Popen, timeout: float = 240) -> dict[str, str]:
    """Poll the store until the pretrain run logged its first epoch; ``{run name: run id}`` of its runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        experiment = client.get_experiment_by_name("tiny")
        runs = client.search_runs([experiment.experiment_id]) if experiment else []
        if any(LOSS in run.data.metrics for run in runs):
            return {run.info.run_name: run.info.run_id for run in runs}
        time.sleep(0.1)
    process.kill()
    pytest.fail(f"pretraining logged no epoch: {process.communicate()[1][-2000:]}")


def test_owner_tags_name_this_process():
    tags = owner_tags()
    assert tags[names.OWNER_HOST_TAG] == socket.gethostname()
    assert tags[names.OWNER_PID_TAG] == str(os.getpid())
    assert tags[names.OWNER_START_TAG] == process_start(os.getpid())
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    assert process_start(ended.pid) is None


def test_runs_of_other_hosts_live_processes_and_no_owner_are_left_alone(empty_store, tmp_path):
    shutil.copy(empty_store, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    experiment = client.create_experiment("orphans")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    start = owner_tags()[names.OWNER_START_TAG]
    host = socket.gethostname()
    owners = {
        "dead": {
            names.OWNER_HOST_TAG: host,
            names.OWNER_PID_TAG: str(dead.pid),
            names.OWNER_START_TAG: start,
        },
        "reused_pid": {
            names.OWNER_HOST_TAG: host,
            names.OWNER_PID_TAG: str(os.getpid()),
            names.OWNER_START_TAG: "0@another-boot",
        },
        "alive": owner_tags(),
        "other_host": {
            **owner_tags(),
            names.OWNER_HOST_TAG: "another-host",
            names.OWNER_PID_TAG: str(dead.pid),
        },
        "no_owner": {},
    }
    runs = {
        name: client.create_run(experiment, tags=tags, run_name=name).info.run_id
        for name, tags in owners.items()
    }
    ended = end_orphaned_runs(uri)
    assert sorted(ended) == sorted([runs["dead"], runs["reused_pid"]])
    statuses = {name: client.get_run(run_id).info.status for name, run_id in runs.items()}
    assert statuses == {
        "dead": "KILLED",
        "reused_pid": "KILLED",
        "alive": "RUNNING",
        "other_host": "RUNNING",
        "no_owner": "RUNNING",
    }
    reason = client.get_run(runs["dead"]).data.tags[names.ORPHANED_TAG]
    assert reason.startswith(f"process {dead.pid} on host {host} ended without closing the run; found by ")


@pytest.mark.slow
def test_kill_9_then_any_command_ends_the_runs_and_resume_carries_their_history(
    tmp_path, tiny_pipeline, empty_store
):
    client = tiny_pretraining(tmp_path, tiny_pipeline, empty_store)
    process = fewshot_med("pretrain", "tiny.yaml", cwd=tmp_path)
    killed = wait_for_metric(client, process)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert {client.get_run(run_id).info.status for run_id in killed.values()} == {"RUNNING"}

    report = fewshot_med("report", killed["tiny"], "--tracking-uri", "mlruns", cwd=tmp_path)
    report.communicate(timeout=120)
    for run_id in killed.values():
        run = client.get_run(run_id)
        assert run.info.status == "KILLED"
        reason = run.data.tags[names.ORPHANED_TAG]
        assert f"process {process.pid} on host {socket.gethostname()} ended without closing the run" in reason
        assert "found by" in reason and "report" in reason

    interrupted = client.get_metric_history(killed["pretrain"], LOSS)
    resume = fewshot_med("pretrain", "tiny.yaml", "--resume", cwd=tmp_path)
    _, stderr = resume.communicate(timeout=600)
    assert resume.returncode == 0, stderr
    experiment = client.get_experiment_by_name("tiny").experiment_id
    new = {
        run.info.run_name: run for run in client.search_runs([experiment], "attributes.status = 'FINISHED'")
    }
    assert new["pretrain"].data.tags[names.RESUMED_FROM_TAG] == killed["pretrain"]
    assert new["tiny"].data.tags[names.RESUMED_FROM_TAG] == killed["tiny"]
    history = client.get_metric_history(new["pretrain"].info.run_id, LOSS)
    assert sorted(metric.step for metric in history) == list(range(1, EPOCHS + 1))
    carried = {metric.step: metric.value for metric in history if metric.step <= len(interrupted)}
    assert carried == {metric.step: metric.value for metric in interrupted}
