"""The stages of the transfer pipeline, each one plain call whose output is the next one's input.

pretrain -> (meta-train) -> evaluate. Stages never reach back: each takes what it needs as arguments.
Tracking goes through ``fewshot_med.tracking`` (a no-op when tracking is disabled).
"""

from __future__ import annotations

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
    select_classes,
)
from fewshot_med.data.transforms import channel_stats
from fewshot_med.errors import FewshotMedError
from fewshot_med.models import BackboneSpec, create_backbone
from fewshot_med.priors import SwagPosterior
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


def checkpoint_dir(config: Config) -> Path:
    """Where this config's checkpoints live: ``runtime.output_dir/<name>``."""
    return Path(config.runtime.output_dir) / config.name


@dataclass(frozen=True)
class Pretrained:
    """What the pretrain stage hands on: the backbone, its spec, and the SWAG posterior over its
    weights (``None`` unless ``pretrain.swag.enabled``)."""

    backbone: nn.Module
    spec: BackboneSpec
    swag: SwagPosterior | None = None


def pretrain_stage(config: Config, data: Data, device: torch.device, resume: bool) -> Pretrained:
    """Build the backbone and train it on the base classes of the train split; log it as a model,
    with its SWAG posterior (``pretrain.swag``) beside it."""
    base_train, base_val = data.subset("train", "base"), data.subset("val", "base")
    mean, std = channel_stats(base_train.images)
    spec = BackboneSpec(config.model.backbone, 3, data.dataset.image_shape[0], mean, std)
    backbone = create_backbone(
        spec.name, spec.in_chans, spec.image_size, config.model.pretrained, config.model.weights
    )
    swag = None
    with tracking.stage_run("pretrain", tags={"backbone": spec.name}, params=config.pretrain.model_dump()):
        tracking.log_dataset_input(data.dataset, "training", "train", data.roles.base)
        tracking.log_dataset_input(data.dataset, "validation", "val", data.roles.base)
        if config.pretrain.enabled:
            result = pretrain(
                backbone,
                spec,
                base_train,
                base_val,
                config.pretrain,
                device,
                checkpoint_path=checkpoint_dir(config) / "pretrain.pt",
                resume=resume,
                log_metrics=tracking.log_metrics,
                seed=config.seed,
            )
            backbone = result.backbone
            best = {
                "best_val_balanced_accuracy": result.best_val_balanced_accuracy,
                "best_epoch": result.best_epoch,
            }
            tracking.log_metrics({f"pretrain.{key}": value for key, value in best.items()})
            swag = result.swag
            if swag is not None:
                tracking.log_swag(swag)
        tracking.log_dict_artifact(spec.to_dict(), "backbone_spec.json")
        tracking.log_backbone(backbone, spec)
    return Pretrained(backbone, spec, swag)


def meta_train_stage(
    config: Config, data: Data, backbone: nn.Module, spec: BackboneSpec, device: torch.device, resume: bool
) -> nn.Module:
    """Meta-train the backbone on base-class episodes (train split), validated on novel val episodes."""
    settings = config.meta_train
    with tracking.stage_run(
        "meta_train", tags={"algorithm": settings.algorithm}, params=settings.model_dump()
    ):
        tracking.log_dataset_input(data.dataset, "training", "train", data.roles.base)
        tracking.log_dataset_input(data.dataset, "validation", "val", data.roles.novel)
        result = meta_train(
            backbone,
            spec,
            data.subset("train", "base"),
            data.subset("val", "novel"),
            settings,
            device,
            checkpoint_path=checkpoint_dir(config) / f"meta_train_{settings.algorithm}.pt",
            resume=resume,
            log_metrics=tracking.log_metrics,
            seed=config.seed,
        )
        tracking.log_metrics(
            {
                "meta_train.best_val_accuracy": result.best_val_accuracy,
                "meta_train.best_episode": result.best_episode,
            }
        )
        tracking.log_dict_artifact(spec.to_dict(), "backbone_spec.json")
        tracking.log_backbone(result.backbone, spec)
    return result.backbone


def backbone_from_run(run_id: str, config: Config) -> tuple[nn.Module, BackboneSpec]:
    """The backbone an earlier run produced: its meta-trained one if any, else its pretrained one.

    ``run_id`` may be a pipeline run (its stage runs are searched) or a stage run itself.
    """
    for stage in ("meta_train", "pretrain"):
        child = tracking.find_stage_run(run_id, stage, config.tracking)
        if child is not None:
            return tracking.load_backbone(child, settings=config.tracking)
    try:
        return tracking.load_backbone(run_id, settings=config.tracking)
    except Exception as error:
        raise FewshotMedError(
            f"run {run_id} holds no backbone model ({type(error).__name__}); pass the id of a run "
            "that ran the pretrain or meta-train stage (see `fewshot-med ui`)"
        ) from None


def swag_from_run(run_id: str, config: Config) -> SwagPosterior | None:
    """The SWAG posterior an earlier run's pretrain stage logged, or ``None`` if it logged none.

    ``run_id`` may be a pipeline run or its pretrain stage run (as for ``backbone_from_run``).
    """
    return tracking.load_swag(run_id, settings=config.tracking)
