"""Reader for MedMNIST-format ``.npz`` files (keys ``{train,val,test}_{images,labels}``)."""

from __future__ import annotations

import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fewshot_med.data.dataset import SPLITS, MedicalImageDataset, Split, label_counts
from fewshot_med.errors import DataError


def _to_nhwc(images: np.ndarray, path: Path, key: str) -> np.ndarray:
    """Return images as ``(N, H, W, C)`` uint8, accepting ``(N, H, W)`` grey input."""
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise DataError(
            f"{path}: '{key}' has shape {images.shape}; expected (N, H, W) grey or (N, H, W, 3) RGB"
        )
    if images.shape[1] != images.shape[2]:
        raise DataError(f"{path}: '{key}' images are {images.shape[1]}x{images.shape[2]}; expected square")
    if images.dtype != np.uint8:
        raise DataError(f"{path}: '{key}' has dtype {images.dtype}; expected uint8 pixel values")
    return images


def _contiguous_class_count(splits: dict[str, Split], path: Path) -> int:
    """The number of classes of a file without a class list: its distinct labels, which must be the ids
    ``0..n-1``; ids with gaps (``0, 1, 99``) are refused, naming the bad values and how many images carry
    them, rather than read as 100 classes, 97 of them empty."""
    labels = np.concatenate([s.labels for s in splits.values()])
    n_classes = len(np.unique(labels))
    bad = labels[(labels < 0) | (labels >= n_classes)]
    if len(bad):
        raise DataError(
            f"{path}: label(s) {label_counts(bad)} are not among the ids 0..{n_classes - 1} of its "
            f"{n_classes} distinct labels; relabel the classes 0..{n_classes - 1} or give data.class_names"
        )
    return n_classes


def read_medmnist_npz(
    path: str | Path, class_names: Sequence[str] | None = None, name: str | None = None
) -> MedicalImageDataset:
    """Read a MedMNIST-format ``.npz`` file.

    Args:
        path: the file; it must hold ``train_images``, ``train_labels``, ``val_*`` and ``test_*``.
            Images are ``(N, H, W)`` or ``(N, H, W, 3)`` uint8; labels ``(N,)`` or ``(N, 1)``.
        class_names: one name per label index; defaults to ``class_0 … class_{C-1}`` where ``C``
            is the number of distinct labels, which must then be ``0..C-1``.
        name: dataset name for logs; defaults to the file stem.

    Returns:
        The dataset, with ``source`` set to the resolved path.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"{path}: no such file; check the path or set FEWSHOT_MED_DATA")
    try:
        archive = np.load(path, allow_pickle=False)
        keys = set(archive.files)
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise DataError(
            f"{path}: not a readable .npz archive ({error}); re-download or re-export it"
        ) from None
    expected = [f"{s}_{kind}" for s in SPLITS for kind in ("images", "labels")]
    missing = [k for k in expected if k not in keys]
    if missing:
        raise DataError(f"{path}: missing key(s) {missing}; a MedMNIST-format file needs {expected}")
    splits: dict[str, Split] = {}
    try:
        for split in SPLITS:
            images = _to_nhwc(archive[f"{split}_images"], path, f"{split}_images")
            labels = np.asarray(archive[f"{split}_labels"])
            if labels.ndim == 2 and labels.shape[1] == 1:
                labels = labels[:, 0]
            if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
                raise DataError(
                    f"{path}: '{split}_labels' has shape {archive[f'{split}_labels'].shape} for "
                    f"{images.shape[0]} images; expected ({images.shape[0]},) or ({images.shape[0]}, 1)"
                )
            if not np.issubdtype(labels.dtype, np.integer):
                raise DataError(f"{path}: '{split}_labels' has dtype {labels.dtype}; expected integers")
            splits[split] = Split(images=images, labels=labels.astype(np.int64))
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
        raise DataError(f"{path}: truncated or corrupt array data ({error}); re-download the file") from None
    shapes = {s: splits[s].images.shape[1:] for s in SPLITS}
    if len(set(shapes.values())) != 1:
        raise DataError(f"{path}: splits have different image shapes {shapes}; expected one shape")
    if class_names is None:
        class_names = [f"class_{i}" for i in range(_contiguous_class_count(splits, path))]
    return MedicalImageDataset(
        name=name or path.stem,
        class_names=tuple(class_names),
        splits=splits,
        source=str(path.resolve()),
    )
