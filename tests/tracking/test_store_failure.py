"""A tracking store that fails mid-run: one line naming the store and the surviving checkpoint, and a
``--resume`` that completes once the store works again; "database is locked" is retried, boundedly."""

import os
import signal
import sqlite3

import pytest
import requests
from mlflow.exceptions import MlflowException
from test_orphan_runs import fewshot_med, tiny_pretraining, wait_for_metric

from fewshot_med.tracking import _store, names


def test_locked_database_calls_are_retried_a_bounded_number_of_times(monkeypatch):
    monkeypatch.setattr(_store, "LOCKED_FIRST_WAIT", 0.0)
    calls = []

    def locked_twice() -> str:
        calls.append(1)
        if len(calls) <= 2:
            raise MlflowException(
                "(sqlite3.OperationalError) database is locked"
            ) from sqlite3.OperationalError("database is locked")
        return "written"

    assert _store.retrying(locked_twice) == "written" and len(calls) == 3

    def always_locked() -> None:
        calls.append(1)
        raise sqlite3.OperationalError("database is locked")

    calls.clear()
    with pytest.raises(sqlite3.OperationalError):
        _store.retrying(always_locked)
    assert len(calls) == _store.LOCKED_ATTEMPTS

    def read_only() -> None:
        calls.append(1)
        raise sqlite3.OperationalError("attempt to write a readonly database")

    calls.clear()
    with pytest.raises(sqlite3.OperationalError):
        _store.retrying(read_only)
    assert len(calls) == 1


def test_a_dataset_row_inserted_by_a_concurrent_run_is_retried(monkeypatch):
    """Two runs logging the same dataset input to one PostgreSQL-backed server: the loser's insert
    fails on the primary key, and its retry finds the row."""
    from mlflow.exceptions import RestException

    monkeypatch.setattr(_store, "LOCKED_FIRST_WAIT", 0.0)
    calls = []

    def lost_the_race_once() -> str:
        calls.append(1)
        if len(calls) == 1:
            raise RestException(
                {
                    "error_code": "BAD_REQUEST",
                    "message": "(psycopg.errors.UniqueViolation) duplicate key value violates unique "
                    'constraint "dataset_pk"',
                }
            )
        return "linked"

    assert _store.retrying(lost_the_race_once) == "linked" and len(calls) == 2

    def bad_request() -> None:
        calls.append(1)
        raise RestException({"error_code": "INVALID_PARAMETER_VALUE", "message": "bad metric name"})

    calls.clear()
    with pytest.raises(RestException):
        _store.retrying(bad_request)
    assert len(calls) == 1


def test_store_failures_are_told_from_other_errors():
    try:
        try:
            raise requests.exceptions.ConnectionError("Connection refused")
        except requests.exceptions.ConnectionError as error:
            raise MlflowException(f"API request to http://127.0.0.1:1/api failed with exception {error}")  # noqa: B904 (as MLflow raises it)
    except MlflowException as error:
        assert _store.failure_reason(error) == "the server does not answer: Connection refused"
    assert _store.failure_reason(MlflowException("Run 'abc' not found")) is None
    expected = r"tracking store sqlite:///x\.db failed \(disk I/O error\)"
    with pytest.raises(_store.StoreError, match=expected), _store.store_failures("sqlite:///x.db"):
        raise sqlite3.OperationalError("disk I/O error")


@pytest.mark.slow
def test_a_store_that_fails_mid_run_gives_one_line_and_resume_completes(tmp_path, tiny_pipeline, empty_store):
    client = tiny_pretraining(tmp_path, tiny_pipeline, empty_store)
    store, database = tmp_path / "mlruns", tmp_path / "mlruns" / "mlflow.db"
    checkpoint = tmp_path / "outputs" / "tiny" / "pretrain.pt"
    process = fewshot_med("pretrain", "tiny.yaml", cwd=tmp_path)
    failed = wait_for_metric(client, process)
    # SQLite cannot create its journal: every later access fails, also for root (whom chmod does not stop)
    journal = store / "mlflow.db-journal"
    journal.mkdir()
    store.chmod(0o555)
    try:
        stdout, stderr = process.communicate(timeout=300)
    finally:
        store.chmod(0o755)
        journal.rmdir()
    assert process.returncode not in (0, -signal.SIGKILL), stderr
    lines = [line for line in (stdout + stderr).splitlines() if not line.startswith("pretrain: epoch")]
    assert len(lines) <= 3, stdout + stderr
    assert "Traceback" not in stderr
    error = lines[-1]
    assert error.startswith(f"error: tracking store sqlite:///{database} failed ("), error
    assert "the checkpoint outputs/tiny/pretrain.pt is intact" in error and "--resume" in error
    assert checkpoint.is_file()

    resume = fewshot_med("pretrain", "tiny.yaml", "--resume", cwd=tmp_path)
    _, stderr = resume.communicate(timeout=600)
    assert resume.returncode == 0, stderr
    for run_id in failed.values():
        run = client.get_run(run_id)
        assert run.info.status == "KILLED" and f"process {process.pid}" in run.data.tags[names.ORPHANED_TAG]
    experiment = client.get_experiment_by_name("tiny").experiment_id
    resumed = client.search_runs(
        [experiment], "attributes.status = 'FINISHED' and attributes.run_name = 'pretrain'"
    )
    assert [run.data.tags[names.RESUMED_FROM_TAG] for run in resumed] == [failed["pretrain"]]
    assert os.access(database, os.W_OK)


@pytest.mark.slow
def test_a_store_deleted_mid_run_gives_one_line_and_resume_completes(tmp_path, tiny_pipeline, empty_store):
    # SQLite goes on writing to a deleted database file without an error: the run must notice
    client = tiny_pretraining(tmp_path, tiny_pipeline, empty_store)
    database = tmp_path / "mlruns" / "mlflow.db"
    process = fewshot_med("pretrain", "tiny.yaml", cwd=tmp_path)
    wait_for_metric(client, process)
    database.unlink()
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 2, stderr
    lines = [line for line in (stdout + stderr).splitlines() if not line.startswith("pretrain: epoch")]
    assert len(lines) <= 3, stdout + stderr
    assert "Traceback" not in stderr
    assert lines[-1] == (
        f"error: tracking store sqlite:///{database} failed (its database {database} was deleted); "
        "the checkpoint outputs/tiny/pretrain.pt is intact: fix the store and rerun with --resume"
    )

    resume = fewshot_med("pretrain", "tiny.yaml", "--resume", cwd=tmp_path)
    _, stderr = resume.communicate(timeout=600)
    assert resume.returncode == 0, stderr
    # read the new file directly: MLflow's cached store of this URI still holds the deleted one open
    with sqlite3.connect(database) as connection:
        resumed = connection.execute("SELECT status FROM runs WHERE name = 'pretrain'").fetchall()
    assert resumed == [("FINISHED",)]
