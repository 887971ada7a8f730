"""A quick robustness-suite run on the quickstart config (demo data), checked in its document and MLflow."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow import MlflowClient

from benchmarks import run
from benchmarks.suites import robustness
from fewshot_med.tracking import names

QUICKSTART = Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"


def test_the_suite_writes_its_own_document_by_default():
    assert run.default_document("robustness", quick=False) == Path("docs/robustness.md")
    assert run.default_document("robustness", quick=True) == Path("outputs/robustness-quick.md")
    assert run.default_document("peers", quick=False) == run.DOCUMENT


@pytest.mark.slow
def test_quick_run_writes_tables_checks_and_metrics(tmp_path):
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path)
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        patch.setattr(robustness, "DATASETS", {"quickstart": QUICKSTART})
        patch.setattr(robustness, "SECTIONS", {"quickstart": robustness.SECTIONS["pbc"]})
        argv = ["--suite", "robustness", "--quick", "--threads", "1", "--output", "robustness.md"]
        assert run.main(argv) == 0
    text = (tmp_path / "robustness.md").read_text()
    assert "<!-- suite:robustness -->" in text and "<!-- dataset:quickstart -->" in text
    assert "#### 5-shot: accuracy and pooled ECE under attack" in text
    for row in ("| clean |", "| fgsm 8/255 |", "| pgd2 1/255 |", "| pgd4 8/255 |", "| pgd2 32/255 |"):
        assert row in text, row
    assert "#### Support-set attack" in text and "| protonet | 5 |" in text
    assert "#### Gradient-masking check" in text
    assert "Not attacked: bd_cspn (transductive" in text
    # the other studies of the suite follow the attacks, on the same opened dataset
    training, poisoning = text.index("#### Robust training"), text.index("#### Poisoning, attack and defence")
    assert text.index("#### Gradient-masking check") < training < poisoning
    assert "| 5 | adversarial querying (ProtoNet) |" in text
    assert "##### Support-set label flips: detection" in text and "##### Feature collision" in text

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("benchmarks")
    (suite,) = client.search_runs([experiment.experiment_id], "attributes.run_name = 'robustness-quick'")
    metrics = suite.data.metrics
    clean = metrics["quickstart." + names.robust_metric(5, "protonet", "clean", "accuracy")]
    attacked = metrics["quickstart." + names.robust_metric(5, "protonet", "pgd4_eps8", "accuracy")]
    assert 0 <= attacked <= clean <= 1
    assert "quickstart." + names.masking_check_metric(5, "logreg") in metrics
    assert any(key.startswith("quickstart.poisoning.") for key in metrics)
