"""Training under torchrun: 2 CPU processes (gloo) match 1 process with the same global batch.

The launch is the real one (``python -m torch.distributed.run --standalone --nproc_per_node 2 -m
fewshot_med run``) on the quickstart config, shrunk. The reference is one process running the same
config's training stages in this test's process.

Tolerance and why not bitwise: DDP averages the ranks' gradients with an all-reduce, which adds the two
half-batch means in another order than one process's full-batch mean, so the weights differ by float
rounding (about 1e-7 per step), which Adam then carries on. Batch-norm would add a real difference:
under DDP each rank normalises with the statistics of its own half batch (PyTorch's SyncBatchNorm, which
would share them, runs only on GPUs), so this test trains a backbone without batch-norm (ConvNeXt, layer
norm) and without augmentation (each rank draws its own), where 2 processes must reproduce 1 process to
float rounding: losses and accuracies within 1e-4; weights within 1e-3, a third of one AdamW step at
the quickstart's lr 3e-3 (Adam divides each gradient coordinate by its own running scale, so rounding
in a near-zero coordinate moves that weight by up to lr: 3.6e-4 was measured).

The evaluation is compared on one backbone: one process evaluates the backbone the 2-process launch
logged (``evaluate --from``), and every metric the launch's evaluation logged (each rank embedding its
share of the images, rank 0 scoring) must match within 1e-6: in eval mode an image's features do not
depend on the rest of its batch, so only float rounding in the batched matrix products may differ.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fewshot_med.config import load_config
from fewshot_med.models import load_checkpoint
from fewshot_med.pipelines.transfer import run_stages
from fewshot_med.tracking import names
from fewshot_med.training import distributed

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
TOLERANCE = 1e-4
WEIGHT_TOLERANCE = 1e-3
EVALUATION_TOLERANCE = 1e-6
#: the pipeline run's metric sections the evaluation writes (``names.test_metric`` and its siblings)
EVALUATION_SECTIONS = ("test.", "val.", "generalised.")
#: the quickstart, shrunk: 2 epochs of 2 steps of 32 images, 4 episodes in 2 steps, one method scored
SHRUNK = [
    "model.backbone=convnext_atto",
    "data.image_size=16",
    "pretrain.epochs=2",
    "pretrain.steps_per_epoch=2",
    "pretrain.batch_size=32",
    "pretrain.warmup_epochs=0",
    "pretrain.augment=false",
    "meta_train.episodes=4",
    "meta_train.val_every=2",
    "meta_train.episodes_per_step=2",
    "meta_train.n_query=3",
    "meta_train.augment=false",
    "methods=[{name: simpleshot}]",
    "episodes.shots=[1]",
    "episodes.n_test_episodes=4",
    "episodes.n_val_episodes=4",
    "evaluation.generalised_episodes=2",
    "evaluation.calibration=[]",
    "tracking.registered_model=null",
    "runtime.num_threads=1",
]


def _overrides(output_dir: Path) -> list[str]:
    return [*SHRUNK, f"runtime.output_dir={output_dir}"]


def _torchrun(tmp_path: Path, nproc: int) -> subprocess.CompletedProcess:
    sets = [arg for override in _overrides(tmp_path / "outputs") for arg in ("--set", override)]
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "FEWSHOT_MED_DIST_TIMEOUT": "240",
    }
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    command = [*launcher, "-m", "fewshot_med", "run", str(QUICKSTART), *sets]
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)


def _max_difference(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> float:
    assert first.keys() == second.keys()
    return max(
        (first[key].double() - second[key].double()).abs().max().item()
        for key in first
        if first[key].is_floating_point()
    )


def _evaluation_metrics(client, run_id: str) -> dict[str, float]:
    metrics = client.get_run(run_id).data.metrics
    return {key: value for key, value in metrics.items() if key.startswith(EVALUATION_SECTIONS)}


def _assert_same_history(distributed_run: list[dict], single: list[dict], keys: set[str]) -> None:
    assert len(distributed_run) == len(single)
    for mine, theirs in zip(distributed_run, single, strict=True):
        assert mine.keys() == theirs.keys()
        for key in keys & mine.keys():  # the initial validation (episode 0) has no training keys
            assert mine[key] == pytest.approx(theirs[key], abs=TOLERANCE), key


def test_one_process_outside_torchrun_is_rank_0_of_1():
    rows = torch.arange(6)
    assert distributed.world() == distributed.World(rank=0, size=1, local_rank=0, backend=None)
    assert distributed.is_main()
    images = rows.numpy()
    assert distributed.share(images) is images and distributed.gather_rows(rows) is rows  # no copy, no call
    assert distributed.broadcast({"a": 1}) == {"a": 1}
    assert distributed.gather(3) == [3]


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(tmp_path, monkeypatch):
    launched = _torchrun(tmp_path, 2)
    assert launched.returncode == 0, launched.stderr[-3000:]
    checkpoints = tmp_path / "outputs" / "quickstart"
    assert sorted(path.name for path in checkpoints.glob("*.pt")) == ["meta_train_protonet.pt", "pretrain.pt"]

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    top = [run for run in runs if names.PARENT_RUN_TAG not in run.data.tags]
    stages = sorted(run.data.tags.get(names.STAGE_TAG, "") for run in runs if run not in top)
    assert len(top) == 1 and top[0].info.status == "FINISHED"
    assert stages.count(names.PRETRAIN) == 1 and stages.count(names.META_TRAIN) == 1
    assert stages.count(names.EVALUATE) == 1
    pretrain_run = next(run for run in runs if run.data.tags.get(names.STAGE_TAG) == names.PRETRAIN)
    assert pretrain_run.data.tags[names.WORLD_SIZE_TAG] == "2"
    assert pretrain_run.data.tags[names.DIST_BACKEND_TAG] == "gloo"
    evaluate_run = next(run for run in runs if run.data.tags.get(names.STAGE_TAG) == names.EVALUATE)
    assert evaluate_run.data.tags[names.WORLD_SIZE_TAG] == "2"  # both ranks embedded; rank 0 scored
    distributed_metrics = _evaluation_metrics(client, top[0].info.run_id)

    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)
    store = [f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", "evaluation.plots=false"]
    one_process = load_config(QUICKSTART, [*_overrides(tmp_path / "single"), *store])
    single_run = run_stages(one_process, ("evaluate",), from_run=top[0].info.run_id).run_id
    single_metrics = _evaluation_metrics(client, single_run)
    assert any(key.startswith("test.") for key in single_metrics)
    assert distributed_metrics.keys() == single_metrics.keys()
    for key, value in single_metrics.items():
        assert distributed_metrics[key] == pytest.approx(value, abs=EVALUATION_TOLERANCE), key

    reference = load_config(QUICKSTART, [*_overrides(tmp_path / "single"), "tracking.enabled=false"])
    run_stages(reference, ("pretrain", "meta_train"))
    for name, keys in (
        ("pretrain.pt", {"train_loss", "train_accuracy", "val_loss", "val_balanced_accuracy"}),
        ("meta_train_protonet.pt", {"train_loss", "train_accuracy", "val_accuracy"}),
    ):
        two, one = (
            load_checkpoint(checkpoints / name),
            load_checkpoint(tmp_path / "single" / "quickstart" / name),
        )
        _assert_same_history(two["history"], one["history"], keys)
        assert _max_difference(two["current"]["backbone"], one["current"]["backbone"]) < WEIGHT_TOLERANCE
    logged = client.get_metric_history(
        pretrain_run.info.run_id, names.stage_metric(names.PRETRAIN, "val_loss")
    )
    single_history = load_checkpoint(tmp_path / "single" / "quickstart" / "pretrain.pt")["history"]
    assert [m.value for m in logged] == pytest.approx([r["val_loss"] for r in single_history], abs=TOLERANCE)
