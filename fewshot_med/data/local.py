"""Local data: a folder with one subfolder per class, or a CSV manifest of image paths."""

from __future__ import annotations

import csv
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from fewshot_med.data.dataset import SPLITS, MedicalImageDataset, Split
from fewshot_med.data.intensity import IntensityConfig
from fewshot_med.data.readers import READER_BY_SUFFIX, is_image_file, read_image
from fewshot_med.data.splits import assign_splits
from fewshot_med.errors import DataError

MANIFEST_COLUMNS = ("path", "label", "patient_id", "split")


def _natural_key(text: str) -> tuple:
    """Sort ``"2" < "10"`` and ``"img2" < "img10"``."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text))


def _read_images(
    paths: Sequence[Path], image_size: int, nifti_slice: int | None, intensity: IntensityConfig | None
) -> np.ndarray:
    """Read files into one ``(N, S, S, C)`` uint8 array; grey images become RGB if any is RGB."""
    images = [
        read_image(path, image_size, nifti_slice, intensity)
        for path in tqdm(paths, desc="reading images", unit="img", leave=False, disable=len(paths) < 200)
    ]
    if any(image.shape[-1] == 3 for image in images):
        images = [np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image for image in images]
    return np.stack(images)


def _build(
    name: str,
    source: Path,
    paths: list[Path],
    label_names: list[str],
    groups: list[str] | None,
    split_names: list[str] | None,
    image_size: int,
    nifti_slice: int | None,
    fractions: Sequence[float],
    seed: int,
    intensity: IntensityConfig | None,
) -> MedicalImageDataset:
    """Read the images and cut them into splits (given, or patient-grouped when not given)."""
    class_names = sorted(set(label_names), key=_natural_key)
    labels = np.asarray([class_names.index(label) for label in label_names], dtype=np.int64)
    group_array = None if groups is None else np.asarray(groups, dtype=str)
    if split_names is None:
        split_array = assign_splits(labels, group_array, fractions, seed)
    else:
        split_array = np.asarray(split_names, dtype=str)
        if group_array is not None:
            _check_no_group_leak(group_array, split_array, source)
    images = _read_images(paths, image_size, nifti_slice, intensity)
    splits = {
        split: Split(
            images=images[split_array == split],
            labels=labels[split_array == split],
            groups=None if group_array is None else group_array[split_array == split],
        )
        for split in SPLITS
    }
    return MedicalImageDataset(name=name, class_names=tuple(class_names), splits=splits, source=str(source))


def _check_no_group_leak(groups: np.ndarray, splits: np.ndarray, source: Path) -> None:
    """Refuse a given split in which one patient appears in two splits."""
    for patient in np.unique(groups):
        in_splits = sorted(str(s) for s in set(splits[groups == patient]))
        if len(in_splits) > 1:
            raise DataError(
                f"{source}: patient '{patient}' is in splits {in_splits}; one patient must stay in one "
                "split (drop the split column to let the toolkit assign patient-grouped splits)"
            )


def read_image_folder(
    root: str | Path,
    image_size: int = 64,
    nifti_slice: int | None = None,
    fractions: Sequence[float] = (0.7, 0.1, 0.2),
    seed: int = 0,
    intensity: IntensityConfig | None = None,
) -> MedicalImageDataset:
    """Read ``root/<class>/<image>`` or ``root/{train,val,test}/<class>/<image>``.

    Without split folders the images are split by ``fractions`` (stratified by class, seeded).

    Args:
        root: the folder.
        image_size: images are resized to ``image_size x image_size``.
        nifti_slice: slice of 3D NIfTI volumes (middle slice when ``None``).
        fractions: train/val/test fractions when the folder has no split subfolders.
        seed: seed of the split assignment.
        intensity: how pixel values become 0..255 (``data.intensity``); ``None`` is mode ``auto``.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"{root}: no such folder; check the path")
    has_split_folders = any((root / split).is_dir() for split in SPLITS)
    split_roots = [(split, root / split) for split in SPLITS] if has_split_folders else [(None, root)]
    paths: list[Path] = []
    labels: list[str] = []
    split_names: list[str] = []
    for split, split_root in split_roots:
        if not split_root.is_dir():
            raise DataError(f"{split_root}: missing split folder; create it with one subfolder per class")
        class_dirs = sorted(
            (d for d in split_root.iterdir() if d.is_dir()), key=lambda d: _natural_key(d.name)
        )
        if not class_dirs:
            raise DataError(f"{split_root}: no class subfolders; put each class's images in its own folder")
        for class_dir in class_dirs:
            files = sorted(
                (f for f in class_dir.rglob("*") if is_image_file(f)), key=lambda f: _natural_key(str(f))
            )
            if not files:
                raise DataError(
                    f"{class_dir}: class folder holds no images ({', '.join(sorted(READER_BY_SUFFIX))}); "
                    "add images or remove the folder"
                )
            paths += files
            labels += [class_dir.name] * len(files)
            split_names += [split] * len(files) if split else []
    return _build(
        root.name,
        root.resolve(),
        paths,
        labels,
        None,
        split_names or None,
        image_size,
        nifti_slice,
        fractions,
        seed,
        intensity,
    )


def manifest_rows(manifest: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """A CSV manifest's columns and its rows (with their line numbers, values stripped), checked:
    ``path`` and ``label`` present, no unknown column (``MANIFEST_COLUMNS``), at least one row."""
    if not manifest.is_file():
        raise DataError(f"{manifest}: no such file; check the path")
    with manifest.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = [c.strip() for c in reader.fieldnames or []]
        rows = list(reader)
    missing = [c for c in ("path", "label") if c not in columns]
    if missing:
        raise DataError(
            f"{manifest}: missing column(s) {missing}; the header must be path,label[,patient_id][,split]"
        )
    unknown = [c for c in columns if c not in MANIFEST_COLUMNS]
    if unknown:
        raise DataError(f"{manifest}: unknown column(s) {unknown}; allowed are {list(MANIFEST_COLUMNS)}")
    if not rows:
        raise DataError(f"{manifest}: the manifest lists no images; add one row per image")
    stripped = [{k.strip(): (v or "").strip() for k, v in row.items() if k is not None} for row in rows]
    return columns, list(enumerate(stripped, start=2))


def read_manifest(
    manifest: str | Path,
    image_size: int = 64,
    nifti_slice: int | None = None,
    fractions: Sequence[float] = (0.7, 0.1, 0.2),
    seed: int = 0,
    intensity: IntensityConfig | None = None,
) -> MedicalImageDataset:
    """Read a CSV manifest with columns ``path,label[,patient_id][,split]``.

    Relative paths are relative to the manifest's folder. With ``split`` (train/val/test) the
    given splits are used and checked for patient leaks; without it, splits are assigned with
    ``assign_splits``, grouped by ``patient_id`` when present so no patient is in two splits.

    Args:
        manifest: the CSV file.
        image_size: images are resized to ``image_size x image_size``.
        nifti_slice: slice of 3D NIfTI volumes (middle slice when ``None``).
        fractions: train/val/test fractions when there is no split column.
        seed: seed of the split assignment.
        intensity: how pixel values become 0..255 (``data.intensity``); ``None`` is mode ``auto``.
    """
    manifest = Path(manifest).expanduser()
    columns, rows = manifest_rows(manifest)
    paths, labels, groups, split_names = [], [], [], []
    for line, row in rows:
        if not row["path"] or not row["label"]:
            raise DataError(f"{manifest}:{line}: empty path or label; fill in both")
        path = Path(row["path"]).expanduser()
        path = path if path.is_absolute() else manifest.parent / path
        if not path.is_file():
            raise DataError(f"{manifest}:{line}: image {path} does not exist; fix the path")
        if "split" in columns and row["split"] not in SPLITS:
            raise DataError(f"{manifest}:{line}: split '{row['split']}' must be one of {list(SPLITS)}")
        if "patient_id" in columns and not row["patient_id"]:
            raise DataError(f"{manifest}:{line}: empty patient_id; fill it in or drop the column")
        paths.append(path)
        labels.append(row["label"])
        groups.append(row.get("patient_id", ""))
        split_names.append(row.get("split", ""))
    return _build(
        manifest.stem,
        manifest.resolve(),
        paths,
        labels,
        groups if "patient_id" in columns else None,
        split_names if "split" in columns else None,
        image_size,
        nifti_slice,
        fractions,
        seed,
        intensity,
    )
