"""What every benchmark suite takes and returns, and the record that makes its numbers reproducible.

A suite is a plain function ``run(options) -> SuiteReport`` registered in ``benchmarks.run.SUITES``.
``benchmarks.run`` opens the MLflow run, logs the report and writes its markdown section into
``docs/benchmarks.md``.
"""

from __future__ import annotations

import dataclasses
import os
import platform
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

from fewshot_med import tracking
from fewshot_med.config import Config, MethodConfig, load_config
from fewshot_med.data import ClassSubset, EpisodeList
from fewshot_med.evaluation import EpisodeResults, evaluate_frozen
from fewshot_med.evaluation.intervals import paired_difference_ci95
from fewshot_med.methods import METHODS, FewShotMethod, MethodContext, create_method
from fewshot_med.pipelines.episodes import Episodes, check_saved_episodes, draw_episodes
from fewshot_med.pipelines.evaluation import Embedded, embed_subsets, search_on_val
from fewshot_med.pipelines.stages import StageContext, open_context
from fewshot_med.pipelines.transfer import backbone_stages
from fewshot_med.tracking import names

if TYPE_CHECKING:
    import torch
    from matplotlib.figure import Figure


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
#: Under ``--quick``, every config also gets these: one view per image (a smoke run need not pay for
#: a config's test-time views, 8 forward passes per image with ``dihedral``) and 16 px images (a
#: third of the 28 px files' convolution cost).
QUICK_COMMON_OVERRIDES = ("evaluation.test_time_views=identity", "data.image_size=16")
#: Under ``--quick``, these data sources are read from a smaller file (``data.source`` -> quick source).
QUICK_SOURCES = {"ham10000": "ham10000-28"}


@dataclass(frozen=True)
class SuiteOptions:
    """How a suite runs.

    Attributes:
        quick: a smoke run (tiny data, few epochs and episodes) whose numbers mean nothing; minutes.
        seed: seed of training, episode sampling and every randomised method.
        backbone_runs: dataset name -> MLflow run id whose backbone to reuse instead of training one
            (a pipeline run of that dataset's config, e.g. from ``fewshot-med run configs/pbc.yaml``).
        threads: torch CPU threads; all cores when ``None``.
        configs: dataset name (the config's ``name``) -> pipeline config to benchmark instead of the
            suite's built-in datasets (``--config``, peers suite); empty: the built-in ones.
    """

    quick: bool = False
    seed: int = 0
    backbone_runs: Mapping[str, str] = field(default_factory=dict)
    threads: int | None = None
    configs: Mapping[str, Path] = field(default_factory=dict)


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
        verdicts: dataset name -> its machine-readable verdict, one JSON object per setting (empty when
            no setting compared); written beside the markdown (``benchmarks.json``) and logged as
            ``<suite>.json``.
    """

    markdown: str
    metrics: dict[str, float] = field(default_factory=dict)
    record: dict[str, str] = field(default_factory=dict)
    tables: dict[str, str] = field(default_factory=dict)
    figures: dict[str, Figure] = field(default_factory=dict)
    verdicts: dict[str, list[dict[str, object]]] = field(default_factory=dict)


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


@dataclass
class Lineage:
    """Where one dataset's numbers come from: the config, the MLflow run, the backbone, the data and
    episode-list digests (the suites' per-dataset results extend it)."""

    name: str
    config: Config
    run_id: str | None
    backbone_source: str
    data_digest: str
    episode_source: str
    episode_digests: dict[int, str]

    def lineage(self) -> dict[str, object]:
        """These fields by name, to build a suite's per-dataset result from."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(Lineage)}

    def record(self) -> dict[str, str]:
        """The record entries every suite logs per dataset (``<name>.<what>``)."""
        record = {
            names.record_key(self.name, "run_id"): str(self.run_id),
            names.record_key(self.name, "backbone"): self.backbone_source,
            names.record_key(self.name, "data_sha256"): self.data_digest,
            names.record_key(self.name, "episodes"): self.episode_source,
            names.record_key(self.name, "seed"): str(self.config.seed),
        }
        digests = self.episode_digests.items()
        record.update({names.record_key(self.name, "episodes_sha256", names.shot(k)): d for k, d in digests})
        return record


@dataclass(frozen=True)
class OpenedDataset:
    """One dataset as a suite studies it, opened by the pipeline's own stages: the stage context (its
    backbone), every image embedded once, the seeded episodes, and their lineage."""

    context: StageContext
    embedded: Embedded
    episodes: Episodes
    lineage: Lineage


@contextmanager
def open_dataset(
    suite: str,
    name: str,
    config_path: Path,
    options: SuiteOptions,
    quick_overrides: Sequence[str] = (),
    configure: Callable[[Config], Config] | None = None,
    overrides: Sequence[str] = (),
) -> Iterator[OpenedDataset]:
    """Open one dataset of a suite under an MLflow run ``<suite>:<name>`` nested in the suite's run.

    The config gets ``SUITE_OVERRIDES``, the suite's seed, ``overrides`` and, for ``--quick``,
    ``QUICK_COMMON_OVERRIDES``, ``quick_overrides`` and the smaller file of ``QUICK_SOURCES``;
    ``configure`` may adjust it further. The backbone is an earlier run's (``options.backbone_runs``)
    or trained by the pipeline's stages (``backbone_stages``); the episodes are the pipeline's
    (``draw_episodes``), checked against that run's saved lists; the test data and episode lists are
    logged to the dataset's run.
    """
    applied = [*SUITE_OVERRIDES, f"seed={options.seed}", f"episodes.seed={options.seed}", *overrides]
    if options.quick:
        applied += [*QUICK_COMMON_OVERRIDES, *quick_overrides]
    config = load_config(config_path, applied)
    if options.quick and config.data.source in QUICK_SOURCES:
        config = load_config(config_path, [*applied, f"data.source={QUICK_SOURCES[config.data.source]}"])
    if configure is not None:
        config = configure(config)
    context = open_context(config)
    from_run = options.backbone_runs.get(name)
    tags = {names.SUITE_TAG: suite, **({names.FROM_RUN_TAG: from_run} if from_run else {})}
    with tracking.pipeline_run(config, run_name=f"{suite}:{name}", tags=tags) as run:
        context = backbone_stages(context, () if from_run else ("pretrain", "meta_train"), from_run)
        embedded = embed_subsets(context)
        episodes = draw_episodes(config, embedded.pools, context.n_way)
        if from_run is None:
            episode_source = f"drawn with seed {config.episodes.seed}"
        else:
            episode_source = check_saved_episodes(episodes, from_run, config)
        tracking.log_dataset_input(context.data.dataset, "evaluation", "test", context.data.roles.novel)
        for k, test_episodes in episodes.test.items():
            tracking.log_dict_artifact(test_episodes.to_dict(), names.episodes_path("test", k))
        lineage = Lineage(
            name=name,
            config=config,
            run_id=run.run_id,
            backbone_source=_backbone_source(config, from_run),
            data_digest=context.data.dataset.digest,
            episode_source=episode_source,
            episode_digests={k: e.digest() for k, e in episodes.test.items()},
        )
        yield OpenedDataset(context, embedded, episodes, lineage)


def embed_run(config: Config, from_run: str) -> tuple[Embedded, Episodes]:
    """Every image of ``config`` embedded by the backbone of pipeline run ``from_run``, and the
    pipeline's seeded test and val episodes: what a script studying that run starts from, without an
    MLflow run of its own (suites use ``open_dataset``)."""
    context = backbone_stages(open_context(config), (), from_run)
    embedded = embed_subsets(context)
    return embedded, draw_episodes(config, embedded.pools, context.n_way, val=True)


def transductive_frozen_methods(config: Config) -> list[MethodConfig]:
    """The config's transductive methods that work on frozen features (BD-CSPN, TIM, PT-MAP, …)."""
    return [
        m for m in config.methods if METHODS[m.name].transductive and METHODS[m.name].inputs == "features"
    ]


def searched_results(
    method: MethodConfig,
    context: MethodContext,
    features: Mapping[str, torch.Tensor],
    pools: Mapping[str, ClassSubset],
    val_episodes: EpisodeList,
    test_episodes: EpisodeList,
) -> tuple[Callable[[], FewShotMethod], EpisodeResults, EpisodeResults]:
    """A frozen-feature method as the evaluate stage runs it at one K: its ``search`` chosen on the val
    episodes, then scored on the test ones. Returns the chosen method's factory, its test results and
    its val results; ``features`` and ``pools`` are keyed by split (``val``, ``test``)."""
    chosen, val = {}, None
    if method.search:
        chosen, val, _ = search_on_val(method, context, features["val"], pools["val"], val_episodes, {})
    factory = partial(create_method, method.name, context, **method.params, **chosen)
    test = evaluate_frozen(factory, features["test"], pools["test"], test_episodes)
    if val is None:
        val = evaluate_frozen(factory, features["val"], pools["val"], val_episodes)
    return factory, test, val


def _backbone_source(config: Config, from_run: str | None) -> str:
    """A sentence saying where a suite's backbone comes from."""
    if from_run is not None:
        return f"reused from MLflow run `{from_run}`"
    stages = "pretrained"
    if config.meta_train.enabled:
        stages += f" then meta-trained ({config.meta_train.algorithm})"
    return f"{stages} in this run ({config.pretrain.epochs} epochs)"


def paired_on_common_episodes(
    a: EpisodeResults, b: EpisodeResults, metric: str = "accuracy"
) -> tuple[float, float]:
    """``metric`` of ``a`` minus ``b`` on their common episodes (fine-tuning rows run the first N of
    the same list), mean and 95% half-width."""
    n = min(len(a), len(b))
    return paired_difference_ci95(a.values(metric)[:n], b.values(metric)[:n])
