"""What every benchmark suite takes and returns, and the record that makes its numbers reproducible.

A suite is a plain function ``run(options) -> SuiteReport`` registered in ``benchmarks.run.SUITES``.
``benchmarks.run`` opens the MLflow run, logs the report and writes its markdown section into
``docs/benchmarks.md``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from fewshot_med import tracking
from fewshot_med.config import Config
from fewshot_med.errors import FewshotMedError
from fewshot_med.evaluation import EpisodeResults
from fewshot_med.evaluation.intervals import paired_difference_ci95
from fewshot_med.methods import MethodContext
from fewshot_med.models import BackboneSpec
from fewshot_med.priors import SwagPosterior
from pipelines.evaluation import Episodes, draw_episodes, embed_subsets
from pipelines.stages import Data, backbone_from_run, meta_train_stage, pretrain_stage, swag_from_run

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


#: Applied to every config: the suite's own MLflow experiment; no generalised rows, plots or registry.
SUITE_OVERRIDES = (
    "tracking.experiment=benchmarks",
    "tracking.registered_model=null",
    "evaluation.generalised=false",
    "evaluation.plots=false",
)


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


def pipeline_backbone(
    config: Config, data: Data, device: torch.device, from_run: str | None
) -> tuple[torch.nn.Module, BackboneSpec, SwagPosterior | None, str]:
    """The config's backbone, the SWAG posterior of its pretraining (``None`` if it collected none)
    and a sentence saying where they come from: reused from ``from_run``, else trained by the
    pipeline's own stages (pretrained, then meta-trained when the config says so)."""
    if from_run is not None:
        backbone, spec = backbone_from_run(from_run, config)
        swag = swag_from_run(from_run, config)
        return backbone.to(device), spec, swag, f"reused from MLflow run `{from_run}`"
    pretrained = pretrain_stage(config, data, device, resume=False)
    backbone, spec, swag = pretrained.backbone, pretrained.spec, pretrained.swag
    stages = "pretrained"
    if config.meta_train.enabled:
        backbone = meta_train_stage(config, data, backbone, spec, device, resume=False)
        stages += f" then meta-trained ({config.meta_train.algorithm})"
    return backbone, spec, swag, f"{stages} in this run ({config.pretrain.epochs} epochs)"


def suite_episodes(config: Config, pools: dict, n_way: int, from_run: str | None) -> tuple[Episodes, str]:
    """The seeded episode lists; with ``from_run``, checked to be the very test lists that run saved
    (so every number here is on the episodes of that run's own evaluation)."""
    drawn = draw_episodes(config, pools, n_way)
    if from_run is None:
        return drawn, f"drawn with seed {config.episodes.seed}"
    with tempfile.TemporaryDirectory(prefix="fewshot-med-episodes-") as folder:
        for k, episodes in drawn.test.items():
            path = tracking.download_stage_artifact(
                from_run, "evaluate", f"episodes/test_{k}shot.json", Path(folder), config.tracking
            )
            if path is None:
                return drawn, f"drawn with seed {config.episodes.seed} (run `{from_run}` saved none)"
            saved = json.loads(path.read_text(encoding="utf-8"))
            saved.pop("format_version", None)  # runs before format-versioned artifacts lack it
            if saved != json.loads(json.dumps(dataclasses.asdict(episodes))):
                raise FewshotMedError(
                    f"the {k}-shot test episodes saved by run {from_run} differ from those this config draws "
                    f"(seed {config.episodes.seed}); pass a run of the same config and seed to --from"
                )
    return drawn, f"drawn with seed {config.episodes.seed}, identical to those saved by run `{from_run}`"


@dataclass
class Embedded:
    """What a suite evaluates on: the subsets and their ``(n, D)`` features, the methods' context, the
    episode lists, and a sentence saying where the episodes come from."""

    subsets: dict
    features: dict[str, torch.Tensor]
    context: MethodContext
    episodes: Episodes
    episode_source: str


def embed_and_draw(
    config: Config,
    data: Data,
    backbone: torch.nn.Module,
    spec: BackboneSpec,
    device: torch.device,
    from_run: str | None,
    swag: SwagPosterior | None = None,
) -> Embedded:
    """Embed every image once, draw the seeded episodes (checked against ``from_run``'s, see
    ``suite_episodes``), and log the test data and episode lists to the current MLflow run."""
    subsets, features, context = embed_subsets(config, data, backbone, spec, device, swag)
    n_way = config.episodes.n_way or len(data.roles.novel)
    pools = {"test": subsets["novel_test"], "val": subsets["novel_val"]}
    episodes, episode_source = suite_episodes(config, pools, n_way, from_run)
    tracking.log_dataset_input(data.dataset, "evaluation", "test", data.roles.novel)
    for k, test_episodes in episodes.test.items():
        tracking.log_dict_artifact(test_episodes.to_dict(), f"episodes/test_{k}shot.json")
    return Embedded(subsets, features, context, episodes, episode_source)


def paired_on_common_episodes(
    a: EpisodeResults, b: EpisodeResults, metric: str = "accuracy"
) -> tuple[float, float]:
    """``metric`` of ``a`` minus ``b`` on their common episodes (fine-tuning rows run the first N of
    the same list), mean and 95% half-width."""
    n = min(len(a), len(b))
    return paired_difference_ci95(a.values(metric)[:n], b.values(metric)[:n])
