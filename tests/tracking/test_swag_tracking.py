"""SWAG posteriors in MLflow: logged beside the pretrained backbone and found again from the pipeline run."""

from __future__ import annotations

import mlflow
import pytest
import torch
from torch import nn

from fewshot_med import tracking
from fewshot_med.config import Config
from fewshot_med.pipelines.stages import StageContext, load_data, pretrain_stage
from fewshot_med.priors import SwagCollector, SwagPosterior


def config(**sections: object) -> Config:
    return Config.model_validate({"name": "t", "data": {"source": "demo"}, **sections})


def a_posterior() -> SwagPosterior:
    module, collector = nn.Linear(3, 2), SwagCollector(rank=2)
    for _ in range(3):
        with torch.no_grad():
            for p in module.parameters():
                p.normal_()
        collector.collect(module)
    return collector.posterior()


def assert_same(first: SwagPosterior, second: SwagPosterior) -> None:
    assert (first.names, first.shapes, first.n_snapshots) == (second.names, second.shapes, second.n_snapshots)
    for field in ("mean", "variance", "deviations"):
        assert torch.equal(getattr(first, field), getattr(second, field)), field


def test_logged_posterior_loads_back_from_the_pipeline_or_the_stage_run(store, tmp_path):
    posterior = a_posterior()
    settings = config(tracking={"tracking_uri": str(tmp_path / "mlruns")}).tracking
    with tracking.pipeline_run(config()) as pipeline, tracking.stage_run("pretrain") as stage:
        tracking.log_swag(posterior)
    with tracking.pipeline_run(config()) as bare, tracking.stage_run("pretrain"):
        pass

    artifacts = [item.path for item in store.list_artifacts(stage.run_id, "swag")]
    assert artifacts == ["swag/posterior.pt"]
    assert store.get_run(stage.run_id).data.metrics == {"swag.rank": 2.0, "swag.n_snapshots": 3.0}
    local = store.download_artifacts(stage.run_id, "swag/posterior.pt", str(tmp_path))
    assert_same(SwagPosterior.from_state_dict(torch.load(local, weights_only=True)), posterior)

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'elsewhere.db'}")  # the settings name the store
    try:
        assert_same(tracking.load_swag(pipeline.run_id, settings), posterior)
        assert_same(tracking.load_swag(stage.run_id, settings), posterior)
        assert tracking.load_swag(bare.run_id, settings) is None
    finally:
        mlflow.set_tracking_uri(previous)


def test_disabled_tracking_logs_no_posterior(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with tracking.pipeline_run(config(tracking={"enabled": False})), tracking.stage_run("pretrain"):
        tracking.log_swag(a_posterior())
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_pretrain_stage_logs_the_posterior_of_its_backbone(store):
    torch.set_num_threads(1)
    pretrain = {
        "epochs": 2,
        "batch_size": 32,
        "steps_per_epoch": 2,
        "warmup_epochs": 0,
        "keep": "last",
        "swag": {"enabled": True, "start_epoch": 2, "snapshots_per_epoch": 2},
    }
    settings = config(data={"source": "demo", "image_size": 16}, pretrain=pretrain)
    with tracking.pipeline_run(settings) as pipeline:
        context = StageContext(settings, load_data(settings), torch.device("cpu"))
        backbone = pretrain_stage(context).backbone
    posterior = tracking.load_swag(pipeline.run_id, settings.tracking)
    assert posterior is not None and posterior.n_snapshots == 2 and posterior.rank == 2
    trainable = [(name, tuple(p.shape)) for name, p in backbone.named_parameters() if p.requires_grad]
    assert list(zip(posterior.names, posterior.shapes, strict=True)) == trainable
    stage = tracking.find_stage_run(pipeline.run_id, "pretrain", settings.tracking)
    logged = {item.path for item in store.list_artifacts(stage)}
    assert {"backbone_spec.json", "swag"} <= logged
    assert store.get_run(stage).data.params["swag.rank"] == "20"  # the setting; the metric is the rank kept
    assert store.get_run(stage).data.metrics["swag.rank"] == 2.0
