"""A tiny end-to-end pipeline run on demo data, checked through what MLflow actually holds."""

from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient

from fewshot_med.config import Config
from fewshot_med.errors import ConfigError
from pipelines.transfer import run_stages

TINY = {
    "name": "tiny",
    "data": {"source": "demo", "image_size": 16},
    "model": {"backbone": "resnet10t"},
    "pretrain": {"epochs": 1, "batch_size": 32, "steps_per_epoch": 3, "warmup_epochs": 0},
    "meta_train": {"enabled": True, "episodes": 2, "val_every": 2, "n_query": 3},
    "methods": [
        {"name": "simpleshot"},
        {"name": "finetune", "label": "ft_head", "params": {"mode": "head", "steps": 2}, "max_episodes": 2},
    ],
    "episodes": {"shots": [1, 5], "n_test_episodes": 4, "n_query": 5},
    "evaluation": {"generalised_episodes": 2},
    "runtime": {"output_dir": "outputs"},
}


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    torch.set_num_threads(1)
    return tmp_path


def _children(client: MlflowClient, run) -> dict[str, object]:
    found = client.search_runs(
        [run.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run.info.run_id}'"
    )
    return {child.info.run_name: child for child in found}


@pytest.mark.slow
def test_pipeline_run_tree_metrics_artifacts_and_model(workdir):
    outcome = run_stages(Config.model_validate(TINY))
    assert (workdir / "mlruns" / "mlflow.db").is_file()
    client = MlflowClient(f"sqlite:///{workdir}/mlruns/mlflow.db")
    parent = client.get_run(outcome.run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["data.source"] == "demo" and parent.data.params["seed"] == "0"
    assert len(parent.data.tags["data.digest"]) == 64 and "git_commit" in parent.data.tags

    stages = _children(client, parent)
    assert set(stages) == {"pretrain", "meta_train", "evaluate"}
    history = client.get_metric_history(stages["pretrain"].info.run_id, "pretrain.train_loss")
    assert [m.step for m in history] == [1]
    assert stages["pretrain"].inputs.dataset_inputs[0].dataset.name == "demo.train"

    methods = _children(client, stages["evaluate"])
    assert set(methods) == {"method:simpleshot", "method:ft_head", "method:oracle"}
    simpleshot = methods["method:simpleshot"].data.metrics
    for k in (1, 5):
        for metric in ("accuracy", "balanced_accuracy", "macro_auroc", "ece", "mce", "brier", "nll"):
            assert simpleshot[f"test.{k}shot.{metric}"] >= 0 and f"test.{k}shot.{metric}_ci95" in simpleshot
            assert (
                parent.data.metrics[f"test.{k}shot.simpleshot.{metric}"]
                == simpleshot[f"test.{k}shot.{metric}"]
            )
        assert 0 <= simpleshot[f"generalised.{k}shot.harmonic_mean"] <= 1
    assert "test.1shot.ft_head.accuracy" in parent.data.metrics

    artifacts = {a.path for a in client.list_artifacts(stages["evaluate"].info.run_id)}
    assert {"results.md", "results.json", "episodes"} <= artifacts
    episode_files = {a.path for a in client.list_artifacts(stages["evaluate"].info.run_id, "episodes")}
    assert episode_files == {"episodes/test_1shot.json", "episodes/test_5shot.json"}
    csv = client.download_artifacts(methods["method:simpleshot"].info.run_id, "per_episode/test_5shot.csv")
    assert len(Path(csv).read_text().strip().splitlines()) == 1 + 4  # header + one row per episode

    model = mlflow.pytorch.load_model(f"runs:/{stages['meta_train'].info.run_id}/backbone")
    assert model(torch.zeros(2, 3, 16, 16)).shape == (2, 512)
    rows = outcome.report.few_shot
    assert [(r.method, r.k_shot, len(r)) for r in rows][:4] == [
        ("simpleshot", 1, 4), ("simpleshot", 5, 4), ("ft_head", 1, 2), ("ft_head", 5, 2),
    ]  # fmt: skip

    evaluated = run_stages(
        Config.model_validate({**TINY, "methods": [{"name": "protonet"}]}), ["evaluate"], outcome.run_id
    )
    rerun = client.get_run(evaluated.run_id)
    assert rerun.data.tags["from_run"] == outcome.run_id
    assert "test.5shot.protonet.accuracy" in rerun.data.metrics


def test_failed_stage_is_marked_failed_and_keeps_what_it_logged(workdir):
    config = Config.model_validate({**TINY, "meta_train": {"enabled": False}, "methods": [{"name": "nope"}]})
    with pytest.raises(ConfigError, match="unknown few-shot method 'nope'"):
        run_stages(config)
    client = MlflowClient(f"sqlite:///{workdir}/mlruns/mlflow.db")
    (parent,) = client.search_runs(
        [client.get_experiment_by_name("tiny").experiment_id], filter_string="tags.stages != ''"
    )
    assert parent.info.status == "FAILED"
    stages = _children(client, parent)
    assert stages["pretrain"].info.status == "FINISHED"
    assert stages["evaluate"].info.status == "FAILED"
    assert "pretrain.val_balanced_accuracy" in stages["pretrain"].data.metrics
