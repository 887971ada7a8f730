"""The transfer pipeline: pretrain on common diseases, meta-learn or fine-tune for rare ones, evaluate.

    data -> pretrain (base classes) -> meta-train (optional) -> evaluate (novel classes, fixed episodes)
         -> register (optional: the best adapted classifier, in the MLflow model registry)

``select`` is a stage of its own (``fewshot-med select``): on the same backbone and test episodes, it
compares model-selection criteria that need no validation set (``fewshot_med.pipelines.selection``).

One MLflow parent run per call, with a nested run per stage and per method. The stage commands of
the CLI call ``run_stages`` with a subset of the stages and, optionally, an earlier run's backbone.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from fewshot_med import tracking
from fewshot_med.config import Config
from fewshot_med.errors import FewshotMedError
from fewshot_med.pipelines.evaluation import EvaluationReport, embed_subsets, evaluate_stage
from fewshot_med.pipelines.registration import register_stage
from fewshot_med.pipelines.selection import SelectionReport, select_stage
from fewshot_med.pipelines.stages import (
    EMBEDDING_STAGES,
    StageContext,
    from_run_stage,
    meta_train_stage,
    open_context,
    pretrain_stage,
)
from fewshot_med.tracking import Registration, names
from fewshot_med.training.distributed import is_main

STAGES: tuple[str, ...] = ("pretrain", "meta_train", "evaluate")


@dataclass
class PipelineOutcome:
    """What a pipeline call produced: MLflow run id (``None`` untracked), report, wall seconds per stage,
    where the adapted classifier was registered (when ``tracking.registered_model`` is set), the
    selection study (when the ``select`` stage ran), and the final stage context (its backbone)."""

    run_id: str | None
    report: EvaluationReport | None
    seconds: dict[str, float]
    registration: Registration | None = None
    selection: SelectionReport | None = None
    context: StageContext | None = None


def backbone_stages(
    context: StageContext,
    stages: Sequence[str],
    from_run: str | None = None,
    resume: bool = False,
    seconds: dict[str, float] | None = None,
) -> StageContext:
    """The context with the backbone the later stages use: an earlier run's (``from_run``), then
    pretrained (when ``pretrain`` is in ``stages``), then meta-trained (when ``meta_train`` is in
    ``stages`` and ``meta_train.enabled``, or when it is asked for alone). Each stage's wall time goes
    into ``seconds``."""
    seconds = {} if seconds is None else seconds
    _require_backbone_source(stages, from_run)
    if from_run is not None:
        context = from_run_stage(context, from_run)
    if "pretrain" in stages:
        with _timed("pretrain", seconds):
            context = pretrain_stage(context, resume)
    if "meta_train" in stages and (context.config.meta_train.enabled or list(stages) == ["meta_train"]):
        with _timed("meta_train", seconds):
            context = meta_train_stage(context, resume)
    return context


def run_stages(
    config: Config,
    stages: Sequence[str] = STAGES,
    from_run: str | None = None,
    resume: bool = False,
) -> PipelineOutcome:
    """Run some or all stages in order under one MLflow parent run.

    Args:
        config: the validated config.
        stages: which of ``pretrain``, ``meta_train``, ``evaluate``, ``select`` to run (see
            ``backbone_stages`` for when ``meta_train`` runs).
        from_run: an earlier MLflow run whose backbone (and SWAG posterior, if its pretrain stage logged
            one) the stages start from, instead of pretraining.
        resume: continue interrupted training from the stage's checkpoint.

    On a ``torchrun`` rank other than 0 (``rank_share``: training and embedding stages, untracked), the
    evaluate and select stages are this rank's share of their embeddings (``embed_subsets``) only.
    """
    _require_backbone_source(stages, from_run)
    context = open_context(config)
    tags = {names.STAGES_TAG: names.list_value(stages)}
    if from_run:
        tags[names.FROM_RUN_TAG] = from_run
    seconds: dict[str, float] = {}
    report = registration = selection = None
    with tracking.pipeline_run(config, run_name=config.name, tags=tags) as run:
        context = backbone_stages(context, stages, from_run, resume, seconds)
        if not is_main():  # a torchrun rank other than 0: its share of the embeddings rank 0 scores
            for stage in EMBEDDING_STAGES:
                if stage in stages:
                    embed_subsets(context)
            return PipelineOutcome(run.run_id, None, seconds, context=context)
        if "evaluate" in stages:
            with _timed("evaluate", seconds):
                report = evaluate_stage(context)
            if config.tracking.registered_model:
                with _timed("register", seconds):
                    registration = register_stage(context, report)
        if "select" in stages:
            with _timed("select", seconds):
                selection = select_stage(context)
        tracking.log_metrics({names.time_metric(stage): value for stage, value in seconds.items()})
    return PipelineOutcome(run.run_id, report, seconds, registration, selection, context)


def _require_backbone_source(stages: Sequence[str], from_run: str | None) -> None:
    """Refuse stages that would have no backbone: no earlier run and no pretraining."""
    if from_run is None and "pretrain" not in stages:
        raise FewshotMedError(
            f"stages {list(stages)} need a backbone: pass the run id of an earlier run (--from)"
        )


@contextmanager
def _timed(stage: str, seconds: dict[str, float]) -> Iterator[None]:
    """Record a stage's wall time in ``seconds`` and say it on stderr."""
    start = time.perf_counter()
    yield
    seconds[stage] = time.perf_counter() - start
    if is_main():  # every rank of a torchrun launch times its stages; one says so
        print(f"{stage} finished in {seconds[stage]:.1f} s", file=sys.stderr)
