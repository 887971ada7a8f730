"""Class roles: base (common) classes for pretraining, novel (rare) classes for few-shot tasks."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fewshot_med.data.cache import take_rows
from fewshot_med.data.dataset import MedicalImageDataset
from fewshot_med.errors import DataError


@dataclass(frozen=True)
class ClassRoles:
    """Which classes are base (common) and which are novel (rare); others are unused."""

    base: tuple[str, ...]
    novel: tuple[str, ...]

    def role_of(self, class_name: str) -> str:
        """``"base"``, ``"novel"`` or ``"unused"``."""
        if class_name in self.base:
            return "base"
        return "novel" if class_name in self.novel else "unused"

    def check(self, class_names: Sequence[str], where: str) -> None:
        """Refuse unknown or doubly assigned class names, naming ``where`` they came from."""
        for role, names in (("base_classes", self.base), ("novel_classes", self.novel)):
            unknown = [name for name in names if name not in class_names]
            if unknown:
                raise DataError(f"{where}: {role} {unknown} are not classes of the data {list(class_names)}")
        both = sorted(set(self.base) & set(self.novel))
        if both:
            raise DataError(f"{where}: {both} are both base and novel classes; give each class one role")


@dataclass(frozen=True)
class ClassSubset:
    """The images of some classes in one split, relabelled ``0 … n-1`` in ``class_names`` order.

    Attributes:
        images: ``(N, H, W, C)`` uint8.
        labels: ``(N,)`` int64 in ``0 … len(class_names) - 1``.
        indices: ``(N,)`` row of each image in the split it came from.
        class_names: the classes, in label order.
        split: ``train``, ``val`` or ``test``.
        dataset_digest: ``MedicalImageDataset.digest`` of the source, for lineage.
    """

    images: np.ndarray
    labels: np.ndarray
    indices: np.ndarray
    class_names: tuple[str, ...]
    split: str
    dataset_digest: str

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def select_classes(dataset: MedicalImageDataset, split: str, class_names: Sequence[str]) -> ClassSubset:
    """Take the images of ``class_names`` from one split (e.g. base classes of ``train``)."""
    unknown = [name for name in class_names if name not in dataset.class_names]
    if unknown:
        raise DataError(f"{dataset.source}: no class(es) {unknown}; classes are {list(dataset.class_names)}")
    source = dataset.splits[split]
    global_ids = np.asarray([dataset.class_names.index(name) for name in class_names])
    local_of_global = np.full(len(dataset.class_names), -1)
    local_of_global[global_ids] = np.arange(len(global_ids))
    indices = np.flatnonzero(np.isin(source.labels, global_ids))
    return ClassSubset(
        images=take_rows(source.images, indices),  # a cached memmap stays on disk
        labels=local_of_global[source.labels[indices]],
        indices=indices,
        class_names=tuple(class_names),
        split=split,
        dataset_digest=dataset.digest,
    )
