from pathlib import Path

import pytest
import torch


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """An empty working directory (so ``./mlruns`` is fresh), no tracking URI, one torch thread."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    torch.set_num_threads(1)
    return tmp_path
