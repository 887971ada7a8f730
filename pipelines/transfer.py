"""The transfer pipeline: pretrain on common diseases, meta-learn or fine-tune for rare ones, evaluate.

    data -> pretrain (base classes) -> meta-train (optional) -> evaluate (novel classes, fixed episodes)
         -> register (optional: the best adapted classifier, in the MLflow model registry)

``select`` is a stage of its own (``fewshot-med select``): on the same backbone and test episodes, it
compares model-selection criteria that need no validation set (``pipelines.selection``).

One MLflow parent run per call, with a nested run per stage and per method. The stage commands of
the CLI call ``run_stages`` with a subset of the stages and, optionally, an earlier run's backbone.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from fewshot_med import tracking
from fewshot_med.config import Config
from fewshot_med.data import load_dataset
from fewshot_med.errors import FewshotMedError
from fewshot_med.runtime import resolve_device, seed_everything
from fewshot_med.tracking import Registration
from pipelines.evaluation import EvaluationReport, evaluate_stage
from pipelines.registration import register_stage
from pipelines.selection import SelectionReport, select_stage
from pipelines.stages import Data, backbone_from_run, meta_train_stage, pretrain_stage, swag_from_run

STAGES: tuple[str, ...] = ("pretrain", "meta_train", "evaluate")


@dataclass
class PipelineOutcome:
    """What a pipeline call produced: MLflow run id (``None`` untracked), report, wall seconds per stage,
    where the adapted classifier was registered (when ``tracking.registered_model`` is set), and the
    selection study (when the ``select`` stage ran)."""

    run_id: str | None
    report: EvaluationReport | None
    seconds: dict[str, float]
    registration: Registration | None = None
    selection: SelectionReport | None = None


def load_data(config: Config) -> Data:
    """The config's dataset with its class roles, checked against each other."""
    dataset = load_dataset(config.data.source, config.data.load_options())
    roles = config.roles()
    roles.check(dataset.class_names, f"config '{config.name}' data")
    return Data(dataset, roles)


def run_stages(
    config: Config,
    stages: Sequence[str] = STAGES,
    from_run: str | None = None,
    resume: bool = False,
) -> PipelineOutcome:
    """Run some or all stages in order under one MLflow parent run.

    Args:
        config: the validated config.
        stages: which of ``pretrain``, ``meta_train``, ``evaluate``, ``select`` to run; ``meta_train``
            runs only when ``config.meta_train.enabled`` or when it is asked for alone.
        from_run: an earlier MLflow run whose backbone the stages start from (instead of pretraining);
            the evaluation also gets the SWAG posterior of its pretrain stage, if it logged one.
        resume: continue interrupted training from the stage's checkpoint.
    """
    if from_run is None and "pretrain" not in stages:
        raise FewshotMedError(
            f"stages {list(stages)} need a backbone: pass the run id of an earlier run (--from)"
        )
    device = resolve_device(config.runtime.device)
    if config.runtime.num_threads:
        torch.set_num_threads(config.runtime.num_threads)
    seed_everything(config.seed)
    data = load_data(config)
    tags = {"stages": ",".join(stages), **({"from_run": from_run} if from_run else {})}
    seconds: dict[str, float] = {}
    swag = None
    with tracking.pipeline_run(config, run_name=config.name, tags=tags) as run:
        if from_run is not None:
            backbone, spec = backbone_from_run(from_run, config)
            if "evaluate" in stages:
                swag = swag_from_run(from_run, config)
        if "pretrain" in stages:
            with _timed("pretrain", seconds):
                pretrained = pretrain_stage(config, data, device, resume)
            backbone, spec, swag = pretrained.backbone, pretrained.spec, pretrained.swag
        if "meta_train" in stages and (config.meta_train.enabled or list(stages) == ["meta_train"]):
            with _timed("meta_train", seconds):
                backbone = meta_train_stage(config, data, backbone, spec, device, resume)
        report = None
        registration = None
        if "evaluate" in stages:
            with _timed("evaluate", seconds):
                report = evaluate_stage(config, data, backbone, spec, device, swag)
            if config.tracking.registered_model:
                with _timed("register", seconds):
                    registration = register_stage(config, data, backbone, spec, device, report, swag)
        selection = None
        if "select" in stages:
            with _timed("select", seconds):
                selection = select_stage(config, data, backbone, spec, device)
        tracking.log_metrics({f"time.{stage}_seconds": value for stage, value in seconds.items()})
    return PipelineOutcome(run.run_id, report, seconds, registration, selection)


@contextmanager
def _timed(stage: str, seconds: dict[str, float]) -> Iterator[None]:
    """Record a stage's wall time in ``seconds`` and say it on stderr."""
    start = time.perf_counter()
    yield
    seconds[stage] = time.perf_counter() - start
    print(f"{stage} finished in {seconds[stage]:.1f} s", file=sys.stderr)
