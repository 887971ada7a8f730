"""Readers, datasets, class roles and few-shot episodes."""

from fewshot_med.data.catalog import CATALOG, LoadOptions, data_root, default_roles, load_dataset
from fewshot_med.data.dataset import SPLITS, MedicalImageDataset, Split
from fewshot_med.data.episodes import Episode, EpisodeList, sample_episodes
from fewshot_med.data.roles import ClassRoles, ClassSubset, select_classes

__all__ = [
    "CATALOG",
    "SPLITS",
    "ClassRoles",
    "ClassSubset",
    "Episode",
    "EpisodeList",
    "LoadOptions",
    "MedicalImageDataset",
    "Split",
    "data_root",
    "default_roles",
    "load_dataset",
    "sample_episodes",
    "select_classes",
]
