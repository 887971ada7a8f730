"""Checking a config stays cheap: validation imports the registries (methods, calibration settings,
selection criteria and transforms, meta-training algorithms), and those must not drag in the libraries
that take seconds to import (SciPy's stats, scikit-learn, pandas, matplotlib, MONAI, MLflow, timm).
They are imported where they are used. torch is unavoidable.

Each check runs in a fresh interpreter and reads ``sys.modules``: it tests what is imported, not timing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("scipy.stats", "sklearn", "pandas", "matplotlib", "monai", "mlflow", "timm")
REGISTRIES = (
    "fewshot_med.methods",
    "fewshot_med.evaluation.calibration",
    "fewshot_med.selection.candidates",
    "fewshot_med.selection.criteria",
    "fewshot_med.training.meta",
)


@pytest.fixture(scope="module", autouse=True)
def _timm_names_cached() -> None:
    """Backbone names are checked against a per-timm-version cache of timm's registry, filled by
    importing timm once; fill it here so the fresh interpreters find it."""
    from fewshot_med.models.backbone import timm_names

    timm_names()


def _modules_after(code: str) -> dict[str, list[str]]:
    """Run ``code`` in a fresh interpreter at the repository root; the heavy and the registry modules
    it left imported."""
    probe = textwrap.dedent(code) + textwrap.dedent(
        f"""
        import json, sys
        print(json.dumps({{
            "heavy": sorted(m for m in {HEAVY!r} if m in sys.modules),
            "registries": sorted(m for m in {REGISTRIES!r} if m in sys.modules),
        }}))
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_importing_the_config_module_imports_nothing_heavy():
    assert _modules_after("import fewshot_med.config")["heavy"] == []


def test_validating_a_config_against_every_registry_imports_nothing_heavy():
    found = _modules_after(
        """
        from fewshot_med.config import load_config

        config = load_config(
            "configs/ham10000.yaml", ["selection.features=[raw, l2]", "selection.criteria=[clml, loo]"]
        )
        assert [m.name for m in config.methods][:2] == ["simpleshot", "protonet"]
        assert config.evaluation.calibration == ["val_temperature", "loo_temperature"]
        """
    )
    assert found["registries"] == sorted(REGISTRIES)  # validation did consult every registry
    assert found["heavy"] == []


def test_refusing_an_unknown_method_imports_nothing_heavy():
    found = _modules_after(
        """
        from fewshot_med.config import load_config
        from fewshot_med.errors import ConfigError

        try:
            load_config("configs/ham10000.yaml", ["methods=[{name: protonett}]"])
        except ConfigError as error:
            assert "did you mean 'protonet'" in str(error), error
        else:
            raise AssertionError("protonett was accepted")
        """
    )
    assert "fewshot_med.methods" in found["registries"]
    assert found["heavy"] == []
