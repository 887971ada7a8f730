"""benchmarks.scripts.pretrain_levers: an ensemble of identical backbones scores as one backbone, and
a quick run logs every arm, seed and ensemble to MLflow."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from mlflow import MlflowClient

from benchmarks.scripts.pretrain_levers import (
    SPLITS,
    ensemble_record,
    novel_episodes,
    novel_pools,
    score_probes,
)
from fewshot_med.config import load_config
from fewshot_med.pipelines.stages import load_data

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "configs" / "quickstart.yaml"


def test_an_ensemble_of_one_backbone_twice_scores_as_that_backbone():
    config = load_config(QUICKSTART)
    pools = novel_pools(load_data(config))
    generator = torch.Generator().manual_seed(0)
    single = {
        split: F.normalize(torch.randn(len(pools[split]), 16, generator=generator), dim=1) for split in SPLITS
    }
    episodes = novel_episodes(config, pools, 20, 20, 5)
    alone = score_probes(single, torch.zeros(16), pools, episodes)
    twice = ensemble_record(config, [single, single], 20, 20, 5)
    assert twice.keys() == alone.keys()
    for key, value in alone.items():  # the concatenation, scaled by 1/√2, has the same geometry
        assert twice[key] == pytest.approx(value, abs=1e-6 if "simpleshot" in key else 0.5), key


@pytest.mark.slow
def test_a_quick_screen_logs_every_arm_seed_and_ensemble(tmp_path):
    store = tmp_path / "mlflow.db"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store}", "HF_HUB_OFFLINE": "1"}
    command = [
        sys.executable, "-m", "benchmarks.scripts.pretrain_levers", str(QUICKSTART),
        "--seeds", "0", "1", "--arm", "reference", "--arm", "born_again:pretrain.born_again_generations=1",
        "--set", "pretrain.epochs=1", "--set", "pretrain.steps_per_epoch=2",
        "--val-episodes", "5", "--test-episodes", "5", "--ensemble",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Ensembles of each arm's backbones" in done.stdout
    client = MlflowClient(f"sqlite:///{store}")
    (run,) = client.search_runs([client.get_experiment_by_name("benchmarks").experiment_id])
    assert run.info.status == "FINISHED"
    name = load_config(QUICKSTART).name
    for arm in ("reference", "born_again"):
        for part in ("seed0", "seed1", "ensemble"):
            accuracy = run.data.metrics[f"{name}.5shot.{arm}.{part}.test.simpleshot"]
            assert 0 <= accuracy <= 100
    table = Path(client.download_artifacts(run.info.run_id, "pretrain_levers.md", str(tmp_path))).read_text()
    assert "| born_again | 2 |" in table
