"""benchmarks.scripts.prior_fair_test: every regime and arm reaches the table and MLflow, the drift is
measured on the weights that train, and a K the config lacks is refused before any fine-tuning."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from mlflow import MlflowClient

from benchmarks.scripts.prior_fair_test import REGIMES, relative_drift, trainable_start
from fewshot_med.config import Config
from fewshot_med.methods import MethodContext
from fewshot_med.models import create_backbone
from fewshot_med.pipelines.transfer import run_stages

REPO = Path(__file__).resolve().parents[2]


def test_drift_is_relative_to_the_trainable_weights_only():
    torch.manual_seed(0)
    backbone = create_backbone("resnet10t", image_size=16).eval()
    context = MethodContext(backbone=backbone)
    start = trainable_start(backbone, {"mode": "last_block"}, context)
    assert start and all(name.startswith("layer4.") for name in start)
    assert relative_drift(backbone, start) == 0.0
    moved = copy.deepcopy(backbone)
    with torch.no_grad():
        for name, param in moved.named_parameters():
            param.copy_(2 * start[name] if name in start else param + 1)  # frozen ones never count
    assert relative_drift(moved, start) == pytest.approx(1.0, rel=1e-6)


@pytest.mark.slow
def test_a_quick_run_logs_every_regime_and_arm(tmp_path, tiny_pipeline, tiny_swag_pretrain, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    settings = {
        **tiny_pipeline,
        "pretrain": tiny_swag_pretrain,
        "meta_train": {"enabled": False},
        "methods": [{"name": "simpleshot"}],
        "evaluation": {"generalised": False, "oracle": False, "plots": False},
    }
    trained = run_stages(Config.model_validate(settings), ("pretrain",)).run_id
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(settings))
    command = [sys.executable, "-m", "benchmarks.scripts.prior_fair_test", str(config), "--from", trained]
    run = {
        "cwd": tmp_path,
        "env": {**os.environ, "PYTHONPATH": str(REPO)},
        "capture_output": True,
        "text": True,
    }

    refused = subprocess.run([*command, "--shots", "3"], **run, timeout=300)
    assert refused.returncode != 0 and "--shots 3: the config's episodes.shots are [1, 5]" in refused.stderr

    done = subprocess.run([*command, "--shots", "1", "--quick", "--threads", "1"], **run, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    rows = [line.split("|")[1:-1] for line in lines if line.startswith("| ") and "---" not in line]
    cells = {(regime.strip(), arm.strip()): "".join(rest) for regime, arm, *rest in rows[1:]}
    expected = [(regime, arm) for regime, _ in REGIMES.values() for arm in ("none", "l2sp", "swag", "bma")]
    assert sorted(cells) == sorted(expected)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    (suite,) = client.search_runs([client.get_experiment_by_name("benchmarks").experiment_id])
    assert suite.info.status == "FINISHED"
    metrics = suite.data.metrics
    for key, (regime, _) in REGIMES.items():
        assert 0 <= metrics[f"tiny.1shot.{key}.none.accuracy"] <= 100
        for arm in ("l2sp", "swag", "bma"):
            # its paired difference, or a row saying fine-tuning diverged (SGD under a tight SWAG
            # prior can: each step is the learning rate times the prior's curvature)
            assert f"tiny.1shot.{key}.{arm}.delta_ci95" in metrics or "diverged" in cells[regime, arm]
    assert metrics["tiny.1shot.adamw_full.none.drift"] > 0
    table = Path(
        client.download_artifacts(suite.info.run_id, "prior_fair_test.md", str(tmp_path))
    ).read_text()
    assert "SWAG posterior of pretraining: yes" in table
