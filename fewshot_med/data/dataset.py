"""The in-memory dataset every reader produces: uint8 images, integer labels, optional groups."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from fewshot_med.data.cache import iter_row_chunks
from fewshot_med.errors import DataError

SPLITS: tuple[str, ...] = ("train", "val", "test")


def label_counts(labels: np.ndarray, limit: int = 5) -> str:
    """``"7 (1 image), 99 (3 images)"``: the distinct values of ``labels`` ``(N,)`` with how many images
    carry each, the first ``limit`` of them (``" and 2 more"`` after)."""
    values, counts = np.unique(labels, return_counts=True)
    shown = [
        f"{v} ({c} image{'s' if c > 1 else ''})" for v, c in zip(values[:limit], counts[:limit], strict=True)
    ]
    return ", ".join(shown) + (f" and {len(values) - limit} more" if len(values) > limit else "")


@dataclass(frozen=True)
class Split:
    """One split of a dataset.

    Attributes:
        images: ``(N, H, W, C)`` uint8 array, ``C`` is 1 (grey) or 3 (RGB).
        labels: ``(N,)`` int64 class indices into the dataset's ``class_names``.
        groups: ``(N,)`` patient (or lesion) identifiers as strings, or ``None`` when unknown.
    """

    images: np.ndarray
    labels: np.ndarray
    groups: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True)
class MedicalImageDataset:
    """Images of several classes in train/val/test splits, as loaded from any source.

    Attributes:
        name: short name used in logs and run names.
        class_names: one name per label index.
        splits: ``{"train": Split, "val": Split, "test": Split}``.
        source: where the data came from (path or URI), recorded as lineage.
    """

    name: str
    class_names: tuple[str, ...]
    splits: Mapping[str, Split]
    source: str

    def __post_init__(self) -> None:
        missing = [s for s in SPLITS if s not in self.splits]
        if missing:
            raise DataError(f"{self.source}: missing split(s) {missing}; every dataset needs {SPLITS}")
        n_classes = len(self.class_names)
        for split_name, split in self.splits.items():
            outside = split.labels[(split.labels < 0) | (split.labels >= n_classes)]
            if len(outside):
                raise DataError(
                    f"{self.source}: {split_name} label {outside[0]} is out of range for {n_classes} classes "
                    f"{list(self.class_names)} (outside 0..{n_classes - 1}: {label_counts(outside)}); "
                    "fix the labels or the class list"
                )

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(H, W, C)`` of every image."""
        return tuple(self.splits["train"].images.shape[1:])  # type: ignore[return-value]

    def class_counts(self) -> dict[str, np.ndarray]:
        """Images per class, ``{split: (n_classes,) int64}``."""
        n_classes = len(self.class_names)
        return {name: np.bincount(split.labels, minlength=n_classes) for name, split in self.splits.items()}

    @cached_property
    def digest(self) -> str:
        """SHA-256 of the class names, images, labels and groups of every split (content, not file): the
        same for the same pixels in memory or mapped from the cache."""
        sha = hashlib.sha256()
        sha.update("\x1f".join(self.class_names).encode())
        for name in SPLITS:
            split = self.splits[name]
            sha.update(name.encode())
            sha.update(str(split.images.shape).encode())
            for chunk in iter_row_chunks(split.images):  # a memmap is read, not copied, whole
                sha.update(chunk.data)
            sha.update(np.ascontiguousarray(split.labels.astype(np.int64)).data)
            if split.groups is not None:
                sha.update("\x1f".join(map(str, split.groups)).encode())
        return sha.hexdigest()
