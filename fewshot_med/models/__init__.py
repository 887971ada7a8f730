"""Backbones (timm factory), checkpoints and the feature-extractor view."""

from fewshot_med.models.backbone import BackboneSpec, create_backbone, load_weights
from fewshot_med.models.checkpoint import (
    backbone_from_state,
    backbone_state,
    load_checkpoint,
    save_checkpoint,
)
from fewshot_med.models.features import autocast, embed

__all__ = [
    "BackboneSpec",
    "autocast",
    "backbone_from_state",
    "backbone_state",
    "create_backbone",
    "embed",
    "load_checkpoint",
    "load_weights",
    "save_checkpoint",
]
