"""The stages of the transfer pipeline, each one plain call whose output is the next one's input.

pretrain -> (meta-train) -> evaluate -> (register). Every stage takes a ``StageContext`` (config, data,
device, and the backbone with its spec and SWAG posterior once a stage has produced them); training
stages return the context with their backbone. Stages never reach back. Tracking goes through
``fewshot_med.tracking`` (a no-op when tracking is disabled).

A training stage holds its checkpoint's lock (two runs of one config at once: the second stops with
one line), records its MLflow run in every checkpoint, and on ``resume`` links its run to the one that
wrote the checkpoint it continues (``tracking.continue_interrupted_run``). When the tracking store
fails mid-stage, the one-line error names the checkpoint that survives it.

Under ``torchrun`` (``fewshot_med.training.distributed``) every rank runs the training stages together;
rank 0 alone opens MLflow runs, holds the checkpoint's lock and writes it. In the stages that embed
the evaluation pools every rank embeds its share; rank 0 alone scores, logs and registers
(``rank_share``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fewshot_med import tracking
from fewshot_med.config import Config
from fewshot_med.data import (
    ClassRoles,
    ClassSubset,
    MedicalImageDataset,
    load_dataset,
    select_classes,
)
from fewshot_med.data.transforms import channel_stats
from fewshot_med.errors import FewshotMedError
from fewshot_med.methods import MethodContext
from fewshot_med.models import BackboneSpec, create_backbone
from fewshot_med.models.checkpoint import checkpoint_lock
from fewshot_med.models.weights import input_normalization, weights_normalization
from fewshot_med.priors import SwagPosterior
from fewshot_med.runtime import resolve_device, seed_everything
from fewshot_med.tracking import names
from fewshot_med.training import distributed
from fewshot_med.training._harness import checkpoints_owned_by
from fewshot_med.training.meta import meta_train
from fewshot_med.training.pretrain import pretrain


@dataclass(frozen=True)
class Data:
    """The dataset of a run with its class roles, as every stage sees it."""

    dataset: MedicalImageDataset
    roles: ClassRoles

    def subset(self, split: str, role: str) -> ClassSubset:
        """Images of the ``base`` or ``novel`` classes of one split."""
        return select_classes(self.dataset, split, self.roles.base if role == "base" else self.roles.novel)


def load_data(config: Config) -> Data:
    """The config's dataset with its class roles, checked against each other."""
    dataset = load_dataset(config.data.source, config.data.load_options())
    roles = config.roles()
    roles.check(dataset.class_names, f"config '{config.name}' data")
    return Data(dataset, roles)


@dataclass(frozen=True)
class StageContext:
    """What every stage needs: the config, the data, the device, and (once a training stage or an
    earlier run provided them) the backbone, its input spec and the SWAG posterior of its pretraining.

    Attributes:
        backbone: maps ``(N, C, H, W)`` images to ``(N, D)`` features; ``None`` before pretraining.
        spec: the backbone's input size, channels and normalisation.
        swag: the SWAG posterior over the pretrained weights (``pretrain.swag``), or ``None``.
    """

    config: Config
    data: Data
    device: torch.device
    backbone: nn.Module | None = None
    spec: BackboneSpec | None = None
    swag: SwagPosterior | None = None

    @property
    def n_way(self) -> int:
        """Classes per episode: ``episodes.n_way``, else every novel class."""
        return self.config.episodes.n_way or len(self.data.roles.novel)

    def with_backbone(
        self, backbone: nn.Module, spec: BackboneSpec, swag: SwagPosterior | None = None
    ) -> StageContext:
        """This context with a new backbone (and its pretraining's SWAG posterior, if given); its spec
        reads features over the config's ``evaluation.test_time_views``."""
        spec = dataclasses.replace(spec, views=self.config.evaluation.test_time_views)
        return dataclasses.replace(self, backbone=backbone, spec=spec, swag=swag or self.swag)

    def trained(self) -> tuple[nn.Module, BackboneSpec]:
        """The backbone and its spec; a stage that needs them calls this first."""
        if self.backbone is None or self.spec is None:
            raise FewshotMedError("this stage needs a backbone: run pretrain first or pass --from RUN_ID")
        return self.backbone, self.spec

    def method_context(self, base_feature_mean: torch.Tensor | None) -> MethodContext:
        """What the few-shot methods get from the run, with the ``(D,)`` base-class mean feature."""
        backbone, spec = self.trained()
        return MethodContext(
            base_feature_mean=base_feature_mean,
            backbone=backbone,
            spec=spec,
            device=self.device,
            seed=self.config.seed,
            swag=self.swag,
        )


def open_context(config: Config) -> StageContext:
    """Resolve the device, set the thread count and the seeds, and load the data: the context every
    pipeline and benchmark starts from."""
    device = distributed.local_device(resolve_device(config.runtime.device))
    if config.runtime.num_threads:
        torch.set_num_threads(config.runtime.num_threads)
    seed_everything(config.seed)
    return StageContext(config, load_data(config), device)


def checkpoint_dir(config: Config) -> Path:
    """Where this config's checkpoints live: ``runtime.output_dir/<name>``."""
    return Path(config.runtime.output_dir) / config.name


#: the stages every rank of a ``torchrun`` launch runs together; rank 0 alone runs the others
TRAINING_STAGES = ("pretrain", "meta_train")
#: the stages whose evaluation pools every rank embeds a share of (``embed_subsets``); rank 0 scores them
EMBEDDING_STAGES = ("evaluate", "select")


def rank_share(config: Config, stages: Sequence[str]) -> tuple[Config, tuple[str, ...]]:
    """What this process runs of ``stages``: all of them, tracked, on rank 0 (and a single process);
    only the training and embedding stages, untracked, on the other ranks of a ``torchrun`` launch
    (where an embedding stage is this rank's share of the embeddings, which rank 0 gathers and scores).

    Raises:
        FewshotMedError: a global batch the processes cannot share (``pretrain.batch_size``,
            ``meta_train.episodes_per_step``), before any stage starts.
    """
    if "pretrain" in stages and config.pretrain.enabled:
        distributed.check_divisible(config.pretrain.batch_size, "pretrain.batch_size")
    if "meta_train" in stages and (config.meta_train.enabled or list(stages) == ["meta_train"]):
        distributed.check_divisible(config.meta_train.episodes_per_step, "meta_train.episodes_per_step")
    if distributed.is_main():
        return config, tuple(stages)
    untracked = config.model_copy(update={"tracking": config.tracking.model_copy(update={"enabled": False})})
    return untracked, tuple(stage for stage in stages if stage in TRAINING_STAGES + EMBEDDING_STAGES)


def world_tags() -> dict[str, str]:
    """The process-group size and backend of a training stage's run (empty for a single process)."""
    world = distributed.world()
    if world.size == 1:
        return {}
    return {names.WORLD_SIZE_TAG: str(world.size), names.DIST_BACKEND_TAG: str(world.backend)}


@contextmanager
def checkpointed(path: Path) -> Iterator[Path]:
    """Hold the lock of the checkpoint at ``path`` for the block (``checkpoint_lock``; rank 0 only, the
    one that writes it); a tracking store that fails in it names that checkpoint, which survives the
    failure, in its one line."""
    with checkpoint_lock(path) if distributed.is_main() else nullcontext():
        try:
            yield path
        except tracking.StoreError as error:
            raise error.keeping(path) from error


def starting_backbone(config: Config, data: Data) -> tuple[nn.Module, BackboneSpec]:
    """The backbone pretraining starts from (``model``: timm name, hub or local weights) and its spec,
    whose input normalisation is the weights' own or the base-train channel statistics
    (``model.normalization``)."""
    carried = weights_normalization(config.model.backbone, config.model.pretrained, config.model.weights)
    base_train = data.subset("train", "base")
    mean, std = input_normalization(config.model.normalization, carried, channel_stats(base_train.images))
    spec = BackboneSpec(config.model.backbone, 3, data.dataset.image_shape[0], mean, std)
    backbone = create_backbone(
        spec.name, spec.in_chans, spec.image_size, config.model.pretrained, config.model.weights
    )
    return backbone, spec


def pretrain_stage(context: StageContext, resume: bool = False) -> StageContext:
    """Build the backbone and train it on the base classes of the train split; log it as a model,
    with its SWAG posterior (``pretrain.swag``) beside it. Returns the context with that backbone."""
    config, data, device = context.config, context.data, context.device
    base_train, base_val = data.subset("train", "base"), data.subset("val", "base")
    backbone, spec = starting_backbone(config, data)
    swag = None
    tags = {names.BACKBONE_TAG: spec.name, **world_tags()}
    checkpoint = checkpoint_dir(config) / "pretrain.pt"
    with (
        checkpointed(checkpoint) if config.pretrain.enabled else nullcontext(),
        tracking.stage_run(names.PRETRAIN, tags=tags, params=config.pretrain.model_dump()) as run,
    ):
        tracking.log_dataset_input(data.dataset, "training", "train", data.roles.base)
        tracking.log_dataset_input(data.dataset, "validation", "val", data.roles.base)
        if config.pretrain.enabled:
            with checkpoints_owned_by(run.run_id, tracking.continue_interrupted_run):
                result = pretrain(
                    backbone,
                    spec,
                    base_train,
                    base_val,
                    config.pretrain,
                    device,
                    checkpoint_path=checkpoint,
                    resume=resume,
                    log_metrics=tracking.stage_metrics_logger(names.PRETRAIN),
                    seed=config.seed,
                    compile_backbone=config.runtime.compile,
                )
            backbone = result.backbone
            best = {
                "best_val_balanced_accuracy": result.best_val_balanced_accuracy,
                "best_epoch": result.best_epoch,
            }
            tracking.log_metrics(
                {names.stage_metric(names.PRETRAIN, key): value for key, value in best.items()}
            )
            swag = result.swag
            if swag is not None:
                tracking.log_swag(swag)
        tracking.log_dict_artifact(spec.to_dict(), names.BACKBONE_SPEC)
        tracking.log_backbone(backbone, spec)
    return context.with_backbone(backbone, spec, swag)


def meta_train_stage(context: StageContext, resume: bool = False) -> StageContext:
    """Meta-train the backbone on base-class episodes (train split), validated on novel val episodes;
    returns the context with the meta-trained backbone."""
    config, data, device = context.config, context.data, context.device
    backbone, spec = context.trained()
    settings = config.meta_train
    tags = {names.ALGORITHM_TAG: settings.algorithm, **world_tags()}
    with (
        checkpointed(checkpoint_dir(config) / f"meta_train_{settings.algorithm}.pt") as checkpoint,
        tracking.stage_run(names.META_TRAIN, tags=tags, params=settings.model_dump()) as run,
    ):
        tracking.log_dataset_input(data.dataset, "training", "train", data.roles.base)
        tracking.log_dataset_input(data.dataset, "validation", "val", data.roles.novel)
        with checkpoints_owned_by(run.run_id, tracking.continue_interrupted_run):
            result = meta_train(
                backbone,
                spec,
                data.subset("train", "base"),
                data.subset("val", "novel"),
                settings,
                device,
                checkpoint_path=checkpoint,
                resume=resume,
                log_metrics=tracking.stage_metrics_logger(names.META_TRAIN),
                seed=config.seed,
                compile_backbone=config.runtime.compile,
            )
        tracking.log_metrics(
            {
                names.stage_metric(names.META_TRAIN, "best_val_accuracy"): result.best_val_accuracy,
                names.stage_metric(names.META_TRAIN, "best_episode"): result.best_episode,
            }
        )
        tracking.log_dict_artifact(spec.to_dict(), names.BACKBONE_SPEC)
        tracking.log_backbone(result.backbone, spec)
    return context.with_backbone(result.backbone, spec)


def from_run_stage(context: StageContext, run_id: str) -> StageContext:
    """The context with the backbone an earlier run produced (see ``backbone_from_run``) and the SWAG
    posterior its pretrain stage logged, if any."""
    backbone, spec = backbone_from_run(run_id, context.config)
    swag = tracking.load_swag(run_id, settings=context.config.tracking)
    return context.with_backbone(backbone.to(context.device), spec, swag)


def backbone_from_run(run_id: str, config: Config) -> tuple[nn.Module, BackboneSpec]:
    """The backbone an earlier run produced (``tracking.load_run_backbone``), from the config's store."""
    return tracking.load_run_backbone(run_id, config.tracking)
