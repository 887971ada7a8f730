"""``fewshot-med robustness CONFIG --from RUN`` on the quickstart config, tiny, checked in MLflow."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from typer.testing import CliRunner

from fewshot_med.cli import app
from fewshot_med.tracking import names

QUICKSTART = Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"
TINY = (
    "data.image_size=16",
    "pretrain.epochs=1",
    "pretrain.batch_size=32",
    "pretrain.steps_per_epoch=2",
    "pretrain.warmup_epochs=0",
    "meta_train.enabled=false",
    "methods=[{name: protonet}, {name: logreg, search: {features: [l2, raw]}}, {name: bd_cspn}]",
    "episodes.shots=[1]",
    "episodes.n_test_episodes=3",
    "episodes.n_val_episodes=2",
    "evaluation.generalised=false",
    "evaluation.plots=false",
    "tracking.registered_model=null",
    "runtime.num_threads=1",  # small batches on a shared CPU: one thread is faster
)


@pytest.mark.slow
def test_robustness_command_logs_attacks_to_mlflow(tmp_path, empty_store, monkeypatch):
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    shutil.copy(empty_store, tmp_path / "mlflow.db")
    sets = [
        arg
        for value in (*TINY, f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}")
        for arg in ("--set", value)
    ]
    runner = CliRunner()
    try:
        trained = runner.invoke(app, ["run", str(QUICKSTART), *sets])
        assert trained.exit_code == 0, trained.output
        from_run = trained.output.split("MLflow run ")[1].split()[0]
        args = ["robustness", str(QUICKSTART), "--from", from_run, *sets]
        attacked = runner.invoke(
            app, [*args, "--episodes", "2", "--steps", "1", "--steps", "2", "--support-targets", "1"]
        )
    finally:
        torch.set_num_threads(threads)
    assert attacked.exit_code == 0, attacked.output
    assert "#### 1-shot: accuracy and pooled ECE under attack" in attacked.output
    assert "Not attacked: bd_cspn (transductive" in attacked.output
    assert "#### Gradient-masking check" in attacked.output

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("quickstart")
    runs = client.search_runs([experiment.experiment_id], "tags.stage = 'robustness'")
    assert len(runs) == 1
    stage = runs[0]
    parent = client.get_run(stage.data.tags[names.PARENT_RUN_TAG])
    assert parent.data.tags[names.FROM_RUN_TAG] == from_run
    metrics = stage.data.metrics
    for method in ("protonet", "logreg"):
        clean = metrics[names.robust_metric(1, method, "clean", "accuracy")]
        for attack in ("fgsm_eps8", "pgd1_eps8", "pgd2_eps8", "pgd1_eps32"):
            assert metrics[names.robust_metric(1, method, attack, "accuracy")] <= clean + 1e-9
            assert 0 <= metrics[names.robust_metric(1, method, attack, "ece_pooled")] <= 1
        assert metrics[names.masking_check_metric(1, method)] in (0.0, 1.0)
    assert 0 <= metrics[names.support_attack_metric(1, "protonet", "8", "success_rate")] <= 1
    assert (
        names.support_attack_metric(1, "logreg", "8", "success_rate") not in metrics
    )  # not differentiable fit
    assert not any(".bd_cspn." in key for key in metrics)
    assert stage.data.params["robustness.episodes"] == "2" and stage.data.params["robustness.steps"] == "1,2"
    artifacts = {a.path for a in client.list_artifacts(stage.info.run_id)}
    artifacts |= {a.path for a in client.list_artifacts(stage.info.run_id, "robustness")}
    assert {names.ROBUSTNESS_MD, names.ROBUSTNESS_CSV} <= artifacts
    vocabulary = names.Vocabulary((1,), ("protonet", "logreg"), (), ("accuracy",), ())
    for key in metrics:
        assert names.is_defined("metric", key, names.ROBUSTNESS, vocabulary), key
