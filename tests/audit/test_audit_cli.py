"""``fewshot-med audit`` as a user runs it: summary, exit codes, report files, and what MLflow receives."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from fewshot_med.cli import main
from fewshot_med.tracking import names
from tests.audit.conftest import Planted


def run(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    """Run the command in this process (imports stay warm); its exit status, stdout and stderr."""
    monkeypatch.setattr(sys, "argv", ["fewshot-med", *args])
    with pytest.raises(SystemExit) as done:
        main()
    captured = capsys.readouterr()
    return done.value.code or 0, captured.out, captured.err


def logged_text(store: Path) -> tuple[MlflowClient, str, str]:
    """The single audit run's id, and everything it holds as one text: tags, params, artifacts."""
    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name(names.AUDIT).experiment_id])
    run_id = run.info.run_id
    parts = [run.info.run_name, *run.data.tags.values(), *run.data.params.values()]
    for artifact in (names.AUDIT_REPORT_MD, names.AUDIT_REPORT_HTML, names.AUDIT_FLAGGED_CSV):
        parts.append(Path(client.download_artifacts(run_id, artifact, str(store / run_id))).read_text())
    return client, run_id, "\n".join(parts)


def test_audit_writes_the_report_and_logs_a_redacted_copy(
    planted: Planted, store, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "out"
    code, stdout, stderr = run(
        monkeypatch, capsys, "audit", str(planted.manifest), "--out", str(out), "--k", "5"
    )
    assert code == 0, stderr
    assert "  label_conflict            1  error" in stdout
    assert "5 errors," in stdout and f"report: {out / 'report.md'}" in stdout
    with (out / "flagged.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["item", "check", "severity", "detail", "related_item"]
    assert {"item": planted.conflict[0], "related_item": planted.conflict[1]}.items() <= next(
        row for row in rows if row["check"] == "label_conflict"
    ).items()
    client, run_id, text = logged_text(store)
    metrics = client.get_run(run_id).data.metrics
    assert metrics[names.audit_metric("label_conflict")] == 1 and metrics[names.audit_metric("error")] == 5
    assert client.get_run(run_id).data.tags[names.STAGE_TAG] == names.AUDIT
    assert "label_conflict" in text and "path-" in text
    for planted_name in [*planted.planted_names, planted.root.name, "manifest.csv", "images/"]:
        assert planted_name not in text, planted_name


def test_strict_fails_on_errors_and_log_paths_keeps_the_paths(
    planted: Planted, store, tmp_path, monkeypatch, capsys
):
    arguments = ["audit", str(planted.manifest), "--out", str(tmp_path / "out"), "--strict", "--log-paths"]
    code, stdout, _ = run(monkeypatch, capsys, *arguments)
    assert code == 1 and "label_conflict" in stdout
    _, _, text = logged_text(store)
    assert planted.conflict[0] in text and str(planted.manifest) in text


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["/no/such/folder"], "dataset '/no/such/folder' not found"),
        (["demo", "--reference", "configs/ham10000.yaml"], "needs a backbone; add --from"),
        (["demo", "--k", "0"], "give one or more K >= 1"),
    ],
)
def test_bad_input_is_one_line_without_a_traceback(arguments, message, store, monkeypatch, capsys):
    code, _, stderr = run(monkeypatch, capsys, "audit", *arguments)
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], stderr
