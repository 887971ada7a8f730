"""Shared fixtures: the real-data root (tests skip with a reason when it is absent)."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fewshot_med.data import data_root


def _share_the_cores_between_workers() -> None:
    """Under pytest-xdist (``-n``), give each worker its share of the cores, so that torch's threads in
    parallel workers do not oversubscribe them (children inherit ``OMP_NUM_THREADS``)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        torch.set_num_threads(threads)


_share_the_cores_between_workers()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (or ``$FEWSHOT_MED_DATA``); skips the test when the files are absent."""
    root = data_root()
    if not (root / "ham10000_derma").is_dir():
        pytest.skip(
            f"real data not found at {root}: put ../shared/data beside the checkout or set FEWSHOT_MED_DATA"
        )
    return root


#: the tiny demo pipeline of the end-to-end tests: a few steps of every stage, about 20 s on one core
TINY_PIPELINE = {
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


@pytest.fixture(scope="session")
def tiny_pipeline() -> dict:
    """A fresh copy of ``TINY_PIPELINE`` (a config dict) to extend per test."""
    return copy.deepcopy(TINY_PIPELINE)


@pytest.fixture
def tiny_swag_pretrain() -> dict:
    """``TINY_PIPELINE``'s pretraining, long enough to collect a SWAG posterior over its last epoch."""
    return {
        **copy.deepcopy(TINY_PIPELINE["pretrain"]),
        "epochs": 2,
        "steps_per_epoch": 2,
        "keep": "last",
        "swag": {"enabled": True, "start_epoch": 2, "snapshots_per_epoch": 2},
    }


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A freshly migrated, empty MLflow database (creating one takes MLflow about 10 s)."""
    from mlflow import MlflowClient

    database = tmp_path_factory.mktemp("template") / "mlflow.db"
    MlflowClient(f"sqlite:///{database}").search_experiments()
    return database
