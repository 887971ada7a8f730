import shutil
from pathlib import Path

import pytest
from mlflow import MlflowClient


@pytest.fixture
def cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty working directory, with no tracking URI in the environment."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


@pytest.fixture
def store(cwd: Path, empty_store: Path) -> MlflowClient:
    """The default store ``<cwd>/mlruns``, started from a copy of the empty database."""
    (cwd / "mlruns").mkdir()
    shutil.copy(empty_store, cwd / "mlruns" / "mlflow.db")
    return MlflowClient(f"sqlite:///{cwd / 'mlruns' / 'mlflow.db'}")
