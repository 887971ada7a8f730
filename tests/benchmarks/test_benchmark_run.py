"""``python -m benchmarks.run``: sections of the document, options, errors, and a quick peers run
checked through what the file and MLflow hold."""

from __future__ import annotations

import sys

import pytest
from mlflow import MlflowClient

from benchmarks import run
from fewshot_med.data import EpisodeList


def test_a_suite_replaces_only_its_own_section(tmp_path):
    document = tmp_path / "docs" / "benchmarks.md"
    run.write_section(document, "peers", "## Peers\n\nfirst")
    run.write_section(document, "speed", "## Speed\n\nfast")
    run.write_section(document, "peers", "## Peers\n\nsecond")
    text = document.read_text()
    assert text.startswith("# Benchmarks")
    assert text.count("<!-- suite:peers -->") == 1 and text.count("<!-- /suite:speed -->") == 1
    assert "first" not in text and "second" in text and "fast" in text
    assert text.index("## Peers") < text.index("## Speed")  # replaced in place, not appended


def test_backbone_runs_are_parsed_and_bad_ones_refused(capsys):
    assert run.backbone_runs(["ham10000=abc", "pbc=def"]) == {"ham10000": "abc", "pbc": "def"}
    assert run.main(["--suite", "peers", "--from", "ham10000"]) == 1
    assert (
        "--from 'ham10000' must be DATASET=RUN_ID with DATASET one of ham10000, pbc"
        in capsys.readouterr().err
    )
    assert run.main(["--suite", "peers", "--from", "chestxray=abc"]) == 1


def test_a_missing_peer_library_is_one_line_before_any_work(monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "netcal", None)  # import netcal raises ImportError
    assert run.main(["--suite", "peers", "--quick"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: this benchmark needs netcal: install the bench extra, pip install -e '.[bench]'"
    )
    assert list(tmp_path.iterdir()) == []  # no MLflow store, no document


@pytest.mark.slow
@pytest.mark.real_data
def test_quick_peers_suite_writes_the_document_and_mlflow(shared_data, tmp_path, monkeypatch):
    pytest.importorskip("easyfsl", reason="the peers suite needs the bench extra: pip install -e '.[bench]'")
    pytest.importorskip("netcal", reason="the peers suite needs the bench extra: pip install -e '.[bench]'")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FEWSHOT_MED_DATA", str(shared_data))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert run.main(["--suite", "peers", "--quick", "--threads", "1", "--output", "bench.md"]) == 0

    text = (tmp_path / "bench.md").read_text()
    for dataset in ("ham10000", "pbc"):
        for k in (1, 5):
            assert f"#### {dataset}, K = {k}" in text
        assert f"#### {dataset}: temperature scaling here vs netcal, same logits" in text
        assert f"#### {dataset}: accuracy against shots, and the oracle" in text
    assert text.count("| easyfsl TIM | yes |") == 4 and text.count("| **simpleshot** | no |") == 4
    assert "Quick mode" in text and "*Regenerate:* `python -m benchmarks.run --suite peers --quick" in text

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("benchmarks")
    (suite,) = client.search_runs(
        [experiment.experiment_id], "tags.suite = 'peers' and attributes.run_name = 'peers-quick'"
    )
    assert suite.info.status == "FINISHED"
    metrics = suite.data.metrics
    assert (
        0 <= metrics["ham10000.5shot.best_ours_accuracy"] <= 1 and "pbc.1shot.delta_accuracy_ci95" in metrics
    )
    assert len(suite.data.tags["record.ham10000.data_sha256"]) == 64
    artifacts = {a.path for a in client.list_artifacts(suite.info.run_id)}
    assert {"peers.md", "peers_ham10000.csv", "peers_pbc.csv", "accuracy_vs_shots_pbc.png"} <= artifacts
    children = client.search_runs(
        [experiment.experiment_id], f"tags.mlflow.parentRunId = '{suite.info.run_id}'"
    )
    assert {run.info.run_name for run in children} == {"peers:ham10000", "peers:pbc"}
    ham = next(run for run in children if run.info.run_name == "peers:ham10000")
    saved = EpisodeList.load(
        client.download_artifacts(ham.info.run_id, "episodes/test_5shot.json", str(tmp_path))
    )
    assert len(saved) == 12 and saved.k_shot == 5
    stages = client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{ham.info.run_id}'")
    assert [run.data.tags["stage"] for run in stages] == ["pretrain"]  # the backbone trained in the suite


def test_an_interrupted_suite_ends_its_mlflow_run_killed(monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    def interrupted(options):
        raise KeyboardInterrupt  # Ctrl-C, or SIGTERM through the handler of ``python -m benchmarks.run``

    monkeypatch.setitem(run.SUITES, "peers", (interrupted, ()))
    assert run.main(["--suite", "peers", "--output", "bench.md"]) == 130
    assert "interrupted" in capsys.readouterr().err
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    (suite,) = client.search_runs([client.get_experiment_by_name("benchmarks").experiment_id])
    assert (suite.info.run_name, suite.info.status) == ("peers", "KILLED")
    assert not (tmp_path / "bench.md").exists()
