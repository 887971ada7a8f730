"""``python -m benchmarks.run``: sections of the document, options, errors, and a quick peers run
checked through what the file and MLflow hold."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from benchmarks import run
from benchmarks.suites import peers
from fewshot_med.data import EpisodeList
from fewshot_med.tracking import names

QUICKSTART = Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"


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


def test_a_run_on_some_datasets_keeps_the_other_datasets_blocks_with_their_origin(tmp_path):
    path = tmp_path / "bench.md"
    old = "\n\n".join(
        ["## Peers", names.dataset_block("a", "### a: old"), names.dataset_block("b", "### b: old")]
    )
    run.write_section(path, "peers", old + "\n\n*Regenerate:* `old command` · commit `111`")
    run.write_section(
        path, "peers", "## Peers\n\n" + names.dataset_block("a", "### a: new") + "\n\n*Regenerate:* `new`"
    )
    text = path.read_text()
    assert "### a: new" in text and "### a: old" not in text and "### b: old" in text
    assert text.index("*Regenerate:* `new`") < text.index("### b: old")
    assert "*Kept from an earlier run, not rerun by the command below:* `old command` · commit `111`" in text
    run.write_section(path, "peers", "## Peers\n\n" + names.dataset_block("b", "### b: new"))
    text = path.read_text()
    assert "### b: new" in text and "### b: old" not in text and "### a: new" in text


def test_verdicts_of_the_datasets_run_are_replaced_and_others_kept(tmp_path):
    path = tmp_path / "docs" / "benchmarks.json"
    run.write_verdicts(path, "peers", {"ham10000": [{"dataset": "ham10000", "shots": 1, "delta": 1.0}]})
    run.write_verdicts(path, "peers", {"pbc": [{"dataset": "pbc", "shots": 1, "delta": 2.0}]})
    run.write_verdicts(path, "peers", {"ham10000": [{"dataset": "ham10000", "shots": 5, "delta": 3.0}]})
    document = json.loads(path.read_text())
    assert [(v["dataset"], v["shots"], v["delta"]) for v in document["peers"]] == [
        ("pbc", 1, 2.0),
        ("ham10000", 5, 3.0),
    ]


def test_backbone_runs_are_parsed_and_bad_ones_refused(capsys):
    assert run.backbone_runs(["ham10000=abc", "pbc=def"], peers.DATASETS) == {"ham10000": "abc", "pbc": "def"}
    assert run.backbone_runs(["abc"], ["quickstart"]) == {"quickstart": "abc"}  # one dataset: RUN_ID alone
    assert run.main(["--suite", "peers", "--from", "ham10000"]) == 2
    assert (
        "--from 'ham10000' must be DATASET=RUN_ID with DATASET one of ham10000, pbc"
        in capsys.readouterr().err
    )
    assert run.main(["--suite", "peers", "--from", "chestxray=abc"]) == 2


def _named_config(folder: Path, name: str) -> Path:
    """The quickstart config under another ``name``."""
    path = folder / f"{name}.yaml"
    path.write_text(QUICKSTART.read_text().replace("name: quickstart", f"name: {name}"))
    return path


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        ("--config missing.yaml", "missing.yaml: no such config file; see configs/ for examples"),
        ("--config {bad}", "{bad}: episodes.n_queries"),
        (
            "--config {one} --config {two} --from abc",
            "--from 'abc' must be DATASET=RUN_ID with DATASET one of one, two; "
            "RUN_ID alone only with a single --config",
        ),
        (
            "--config {one} --from ham10000=abc",
            "--from 'ham10000=abc' must be DATASET=RUN_ID with DATASET one of one",
        ),
        ("--config {one} --config {one}", "--config {one}: {one} has the same name, 'one'"),
        ("--config {one} --suite bayes", "--config applies to the peers suite only, not bayes"),
        ("--config {one} --suite all", "--config applies to the peers suite only, not speed, bayes"),
        ("--output bench.json", "--output bench.json: name the markdown file; verdicts go beside it (.json)"),
    ],
)
def test_bad_configs_and_runs_are_one_line_before_any_work(argv, error, monkeypatch, tmp_path, capsys):
    configs = tmp_path / "configs"
    configs.mkdir()
    bad = configs / "bad.yaml"
    bad.write_text(QUICKSTART.read_text().replace("n_query: 15", "n_queries: 15"))
    paths = {"one": _named_config(configs, "one"), "two": _named_config(configs, "two"), "bad": bad}
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert run.main(["--suite", "peers", *argv.format(**paths).split()]) == 2  # a later --suite wins
    message = capsys.readouterr().err
    assert message.startswith("error: " + error.format(**paths)) and message.count("\n") == 1
    assert list(work.iterdir()) == []  # no MLflow store, no document


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
        assert f"#### {dataset}: class-imbalanced queries, K = 5" in text
    # per dataset a row per K and one in the imbalanced-query table
    assert text.count("| easyfsl TIM | yes |") == 6 and text.count("| **simpleshot** | no |") == 6
    assert "Quick mode" in text and "*Regenerate:* `python -m benchmarks.run --suite peers --quick" in text
    verdicts = json.loads((tmp_path / "bench.json").read_text())["peers"]
    assert [(v["dataset"], v["shots"]) for v in verdicts] == [
        (d, k) for d in ("ham10000", "pbc") for k in (1, 5)
    ]

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
    assert {"peers.md", "peers.json", "peers_ham10000.csv", "accuracy_vs_shots_pbc.png"} <= artifacts
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
