"""A quick run of the Bayesian-transfer suite, checked through what the document and MLflow hold."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient

from benchmarks import run


@pytest.mark.slow
@pytest.mark.real_data
def test_quick_bayes_suite_writes_the_document_and_mlflow(shared_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FEWSHOT_MED_DATA", str(shared_data))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert run.main(["--suite", "bayes", "--quick", "--threads", "1", "--output", "bench.md"]) == 0

    text = (tmp_path / "bench.md").read_text()
    assert "Quick mode" in text and "*Regenerate:* `python -m benchmarks.run --suite bayes --quick" in text
    for dataset in ("ham10000", "pbc"):
        assert f"### {dataset}" in text
    # every fine-tuning variant is compared with plain fine-tuning, per dataset and K
    for label in ("finetune_l2sp", "finetune_swag", "finetune_swag_bma"):
        assert text.count(f"- K = 5, {label} minus finetune: accuracy") == 2
    assert text.count("| clml | ") >= 5  # the summary over settings and one row per setting
    assert "choice within 1 point of the best in hindsight" in text
    assert text.count("SWAG prior scale chosen on val episodes") == 2

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("benchmarks")
    (suite,) = client.search_runs(
        [experiment.experiment_id], "tags.suite = 'bayes' and attributes.run_name = 'bayes-quick'"
    )
    assert suite.info.status == "FINISHED"
    metrics = suite.data.metrics
    assert "ham10000.5shot.finetune_swag.delta_accuracy_ci95" in metrics
    assert -1 <= metrics["pbc.1shot.select.clml.rank_correlation"] <= 1
    assert suite.data.tags["record.ham10000.prior"].startswith("SWAG over 4 snapshots, rank 4")
    artifacts = {a.path for a in client.list_artifacts(suite.info.run_id)}
    assert {"bayes_ham10000.md", "bayes_pbc.md", "selection_pbc_5shot.csv"} <= artifacts
    children = client.search_runs(
        [experiment.experiment_id], f"tags.mlflow.parentRunId = '{suite.info.run_id}'"
    )
    assert {child.info.run_name for child in children} == {"bayes:ham10000", "bayes:pbc"}
