"""The GPU suite: without CUDA, the real CLI skips it with a reason and succeeds; its measurement functions
time real loops on the CPU (the device is an argument), so the timing code runs without a GPU."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from benchmarks.suites import gpu

REPO = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")
TINY = gpu.Sizes(image_size=16, n_images=32, batch_size=16, steps=1, warmup_steps=1)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: the suite would measure")
def test_the_cli_skips_the_suite_without_cuda_and_succeeds(tmp_path, empty_store):
    (tmp_path / "mlruns").mkdir()
    shutil.copy(empty_store, tmp_path / "mlruns" / "mlflow.db")  # migrating a fresh store takes ~10 s
    env = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
    env |= {"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "benchmarks.run", "--suite", "gpu", "--quick"]
    command += ["--output", "tmp/gpu.md", "--parents"]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr

    text = (tmp_path / "tmp" / "gpu.md").read_text()
    assert "<!-- suite:gpu -->\n## GPU path" in text
    assert f"{gpu.SKIPPED}: torch.cuda.is_available() is false" in text
    assert "*Regenerate:* `python -m benchmarks.run --suite gpu --quick --output tmp/gpu.md --parents`" in (
        text
    )
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("benchmarks")
    (suite,) = client.search_runs([experiment.experiment_id], "tags.suite = 'gpu'")
    assert suite.info.status == "FINISHED"
    assert suite.data.tags["record.gpu.skipped"] == "no CUDA device"


def test_the_measurements_time_real_loops_on_a_forced_device():
    torch.set_num_threads(1)
    report = gpu.measure(CPU, TINY, seed=0, compiles=False, quick=True)
    metrics = report.metrics
    for stage in ("pretrain", "embed"):
        bare, ours = metrics[f"gpu.{stage}.bare_images_per_s"], metrics[f"gpu.{stage}.ours_images_per_s"]
        assert math.isfinite(bare) and math.isfinite(ours) and bare > 0 and ours > 0
        assert metrics[f"gpu.{stage}.ratio"] == pytest.approx(ours / bare)
        assert f"gpu.{stage}.compiled_images_per_s" not in metrics
    assert report.markdown.startswith("## GPU path\n")
    assert "### Pretraining" in report.markdown and "### Evaluation embedding" in report.markdown
    assert "*Quick run: the numbers mean nothing.*" in report.markdown
    assert report.record["gpu.device"] == "cpu"


def test_synthetic_data_is_seeded_balanced_uint8():
    train, val, spec = gpu.synthetic_data(TINY, seed=3)
    again, _, _ = gpu.synthetic_data(TINY, seed=3)
    assert train.images.shape == (32, 16, 16, 3) and train.images.dtype == "uint8"
    assert (train.images == again.images).all()
    assert [int((train.labels == c).sum()) for c in range(gpu.N_CLASSES)] == [8] * 4
    assert len(val) == TINY.batch_size and spec.image_size == 16 and spec.name == gpu.BACKBONE
