"""Shared fixtures: the real-data root (tests skip with a reason when it is absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fewshot_med.data import data_root


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (or ``$FEWSHOT_MED_DATA``); skips the test when the files are absent."""
    root = data_root()
    if not (root / "ham10000_derma").is_dir():
        pytest.skip(
            f"real data not found at {root}: put ../shared/data beside the checkout or set FEWSHOT_MED_DATA"
        )
    return root
