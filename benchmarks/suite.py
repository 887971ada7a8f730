"""What every benchmark suite takes and returns, and the record that makes its numbers reproducible.

A suite is a plain function ``run(options) -> SuiteReport`` registered in ``benchmarks.run.SUITES``.
``benchmarks.run`` opens the MLflow run, logs the report and writes its markdown section into
``docs/benchmarks.md``.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from importlib import metadata
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from fewshot_med.data import EpisodeList

#: Distributions whose versions every benchmark records (absent ones are recorded as such).
RECORDED_PACKAGES = (
    "fewshot-med",
    "torch",
    "timm",
    "numpy",
    "scikit-learn",
    "mlflow",
    "easyfsl",
    "netcal",
)


def require_modules(modules: tuple[str, ...]) -> None:
    """Raise a one-line ``ImportError`` naming the extra to install when a peer library is missing."""
    for module in modules:
        try:
            __import__(module)
        except ImportError:
            raise ImportError(
                f"this benchmark needs {module}: install the bench extra, pip install -e '.[bench]'"
            ) from None


@dataclass(frozen=True)
class SuiteOptions:
    """How a suite runs.

    Attributes:
        quick: a smoke run (tiny data, few epochs and episodes) whose numbers mean nothing; minutes.
        seed: seed of training, episode sampling and every randomised method.
        backbone_runs: dataset name -> MLflow run id whose backbone to reuse instead of training one
            (a pipeline run of that dataset's config, e.g. from ``fewshot-med run configs/pbc.yaml``).
        threads: torch CPU threads; all cores when ``None``.
    """

    quick: bool = False
    seed: int = 0
    backbone_runs: Mapping[str, str] = field(default_factory=dict)
    threads: int | None = None


@dataclass
class SuiteReport:
    """What a suite measured.

    Attributes:
        markdown: the suite's section of ``docs/benchmarks.md`` (starts with a ``##`` heading).
        metrics: headline numbers, logged as MLflow metrics.
        record: what the numbers depend on (run ids, data and episode-list digests, configs), logged as
            MLflow params and printed under the section.
        tables: artifact file name -> text (CSV or markdown), logged as MLflow artifacts.
        figures: artifact file name -> matplotlib figure, logged as PNG artifacts.
    """

    markdown: str
    metrics: dict[str, float] = field(default_factory=dict)
    record: dict[str, str] = field(default_factory=dict)
    tables: dict[str, str] = field(default_factory=dict)
    figures: dict[str, Figure] = field(default_factory=dict)


def environment() -> dict[str, str]:
    """The machine and package versions a benchmark ran on."""
    record = {
        "machine": platform.machine(),
        "processor": _cpu_model(),
        "cpu_cores": str(os.cpu_count()),
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
    }
    for package in RECORDED_PACKAGES:
        try:
            record[f"version.{package}"] = metadata.version(package)
        except metadata.PackageNotFoundError:
            record[f"version.{package}"] = "not installed"
    import torch

    record["torch_threads"] = str(torch.get_num_threads())
    record["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return record


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def episode_list_digest(episodes: EpisodeList) -> str:
    """SHA-256 of an episode list's canonical JSON (the same list gives the same digest anywhere)."""
    payload = json.dumps(asdict(episodes), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()
