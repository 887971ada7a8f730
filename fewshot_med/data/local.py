"""Local data: a folder with one subfolder per class, or a CSV manifest of image paths.

Both are checked before anything is trained on them: labels that differ only in case or spacing are
refused, and copies (the same file twice, or two files with identical pixels) are refused, naming both
rows, the labels and the splits, or, with ``duplicates="keep_first"`` (``data.duplicates``), the first
copy is kept and a warning says how many were dropped.
"""

from __future__ import annotations

import codecs
import csv
import io
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, get_args

import numpy as np
from tqdm.auto import tqdm

from fewshot_med.data.cache import StreamOptions, decode_to_cache, take_rows
from fewshot_med.data.dataset import SPLITS, MedicalImageDataset, Split
from fewshot_med.data.intensity import IntensityConfig
from fewshot_med.data.readers import READER_BY_SUFFIX, is_image_file, read_image_and_digest
from fewshot_med.data.splits import assign_splits
from fewshot_med.errors import DataError

MANIFEST_COLUMNS = ("path", "label", "patient_id", "split")
#: What to do with copies: refuse them, or keep the first copy of each image.
DuplicatePolicy = Literal["error", "keep_first"]
DUPLICATE_POLICIES: tuple[str, ...] = get_args(DuplicatePolicy)


def _natural_key(text: str) -> tuple:
    """Sort ``"2" < "10"`` and ``"img2" < "img10"``."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text))


def _read_images(
    paths: Sequence[Path],
    image_size: int,
    nifti_slice: int | None,
    intensity: IntensityConfig | None,
    volume_index: int | None,
) -> tuple[np.ndarray, list[str]]:
    """Read files into one ``(N, S, S, C)`` uint8 array (grey images become RGB if any is RGB) and the
    SHA-256 of each file's decoded pixels (``read_image_and_digest``)."""
    read = [
        read_image_and_digest(path, image_size, nifti_slice, intensity, volume_index=volume_index)
        for path in tqdm(paths, desc="reading images", unit="img", leave=False, disable=len(paths) < 200)
    ]
    images = [image for image, _ in read]
    if any(image.shape[-1] == 3 for image in images):
        images = [np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image for image in images]
    return np.stack(images), [digest for _, digest in read]


def _check_label_spellings(labels: Sequence[str], origins: Sequence[str]) -> None:
    """Refuse two labels that differ only in case or spacing (``Nevus``, ``nevus``, ``ne vus``)."""
    first: dict[str, tuple[str, str]] = {}  # normalised -> (spelling, where it first appears)
    for label, origin in zip(labels, origins, strict=True):
        key = "".join(label.split()).casefold()
        spelling, where = first.setdefault(key, (label, origin))
        if spelling != label:
            raise DataError(
                f"labels '{spelling}' ({where}) and '{label}' ({origin}) differ only in case or spacing; "
                "spell each class one way"
            )


def _first_copies(
    keys: Sequence[str],
    rows: Sequence[int],
    labels: Sequence[str],
    splits: Sequence[str] | None,
    origins: Sequence[str],
    policy: DuplicatePolicy,
    evidence: str,
) -> list[int]:
    """Positions in ``rows`` of the first row of each key (a resolved path or a pixel digest); under
    ``error`` a later row with a key seen before raises, naming both rows."""
    first: dict[str, int] = {}
    keep = []
    for position, (key, row) in enumerate(zip(keys, rows, strict=True)):
        if key not in first:
            first[key] = row
            keep.append(position)
        elif policy == "error":
            raise DataError(_copy_message(first[key], row, labels, splits, origins, evidence))
    return keep


def _copy_message(
    first: int,
    later: int,
    labels: Sequence[str],
    splits: Sequence[str] | None,
    origins: Sequence[str],
    evidence: str,
) -> str:
    """One line: the two rows holding one image, and what the copy breaks (labels, splits)."""
    rows = f"{origins[first]} and {origins[later]}"
    fix = "or set data.duplicates: keep_first to keep the first"
    if labels[first] != labels[later]:
        return (
            f"{rows}: {evidence} under two labels ('{labels[first]}' and '{labels[later]}'); "
            f"keep the copy with the right label, {fix}"
        )
    if splits is not None and splits[first] != splits[later]:
        return (
            f"{rows}: {evidence} in splits {splits[first]} and {splits[later]}, which leaks it across "
            f"splits; remove one copy, {fix}"
        )
    where = f"both in {splits[first]}" if splits is not None else "the assigned splits may separate them"
    return f"{rows}: {evidence} twice (label '{labels[first]}', {where}); remove the copy, {fix}"


def _build(
    name: str,
    source: Path,
    paths: list[Path],
    origins: list[str],
    label_names: list[str],
    groups: list[str] | None,
    split_names: list[str] | None,
    image_size: int,
    nifti_slice: int | None,
    fractions: Sequence[float],
    seed: int,
    intensity: IntensityConfig | None,
    volume_index: int | None,
    duplicates: DuplicatePolicy | None,
    streaming: StreamOptions | None,
) -> MedicalImageDataset:
    """Check the labels, read the images (into memory, or decoded once into the on-disk cache and mapped,
    ``streaming``), drop or refuse copies (``duplicates``; ``None`` leaves them to the caller's own
    audit), and cut the images into splits (given, or patient-grouped when not given).

    ``origins`` names each image in messages (``manifest.csv:7 (img/a.png)`` or the file path)."""
    if duplicates is not None and duplicates not in DUPLICATE_POLICIES:
        raise DataError(f"data.duplicates '{duplicates}': choose one of {list(DUPLICATE_POLICIES)}")
    _check_label_spellings(label_names, origins)

    def first_copies(keys: Sequence[str], rows: list[int], evidence: str) -> list[int]:
        return _first_copies(keys, rows, label_names, split_names, origins, duplicates, evidence)

    rows = list(range(len(paths)))
    if duplicates is not None:  # the same file twice: found before any image is read
        keep = first_copies([str(path.resolve()) for path in paths], rows, "the same file is listed")
        rows = [rows[position] for position in keep]
    chosen = [paths[row] for row in rows]
    streaming = streaming or StreamOptions()
    if streaming.applies(len(chosen), image_size):
        images, digests = decode_to_cache(chosen, image_size, nifti_slice, intensity, volume_index, streaming)
    else:
        images, digests = _read_images(chosen, image_size, nifti_slice, intensity, volume_index)
    if duplicates is not None:
        keep = first_copies(digests, rows, "identical image content")
        if len(keep) < len(paths):
            warnings.warn(
                f"{source}: {len(paths) - len(keep)} copies dropped, the first of each image kept "
                "(data.duplicates: keep_first)",
                stacklevel=3,
            )
        rows, images = [rows[position] for position in keep], take_rows(images, np.asarray(keep))
    kept_labels = [label_names[row] for row in rows]
    class_names = sorted(set(kept_labels), key=_natural_key)
    labels = np.asarray([class_names.index(label) for label in kept_labels], dtype=np.int64)
    group_array = None if groups is None else np.asarray([groups[row] for row in rows], dtype=str)
    if split_names is None:
        split_array = assign_splits(labels, group_array, fractions, seed)
    else:
        split_array = np.asarray([split_names[row] for row in rows], dtype=str)
        if group_array is not None:
            _check_no_group_leak(group_array, split_array, source)
    splits = {
        split: Split(
            images=take_rows(images, np.flatnonzero(split_array == split)),
            labels=labels[split_array == split],
            groups=None if group_array is None else group_array[split_array == split],
        )
        for split in SPLITS
    }
    return MedicalImageDataset(name=name, class_names=tuple(class_names), splits=splits, source=str(source))


def _check_no_group_leak(groups: np.ndarray, splits: np.ndarray, source: Path) -> None:
    """Refuse a given split in which one patient appears in two splits."""
    splits_of: dict[str, set[str]] = {}
    for patient, split in zip(groups.tolist(), splits.tolist(), strict=True):
        splits_of.setdefault(patient, set()).add(split)
    for patient in sorted(splits_of):
        in_splits = sorted(splits_of[patient])
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
    volume_index: int | None = None,
    duplicates: DuplicatePolicy | None = None,
    streaming: StreamOptions | None = None,
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
        volume_index: the volume of 4D NIfTI files (``data.volume_index``).
        duplicates: ``error`` refuses copies (one file in two folders, identical pixels), ``keep_first``
            keeps the first; ``None`` does not look for them (for callers that audit the data).
        streaming: whether the images are decoded once into the on-disk cache and mapped
            (``fewshot_med.data.cache``); ``None`` streams above ``STREAM_AUTO_BYTES`` of pixels.
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
        [str(path) for path in paths],
        labels,
        None,
        split_names or None,
        image_size,
        nifti_slice,
        fractions,
        seed,
        intensity,
        volume_index,
        duplicates,
        streaming,
    )


def manifest_rows(
    manifest: Path, encoding: str | None = None
) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """A CSV manifest's columns and its rows (with their line numbers, values stripped), checked:
    ``path`` and ``label`` present, no unknown column (``MANIFEST_COLUMNS``), at least one row.

    The file is read as UTF-8 (a byte-order mark dropped) unless ``encoding`` (``data.manifest_encoding``,
    e.g. ``latin-1``) says otherwise; text that does not decode is refused, naming the first bad byte."""
    if not manifest.is_file():
        raise DataError(f"{manifest}: no such file; check the path")
    reader = csv.DictReader(io.StringIO(_manifest_text(manifest, encoding), newline=""))
    try:
        columns = [c.strip() for c in reader.fieldnames or []]
        rows = [(reader.line_num, row) for row in reader]  # the line a row ends on: blank lines count
    except csv.Error as error:
        raise DataError(
            f"{manifest}:{reader.line_num}: not a CSV row ({error}); save the manifest as comma-separated "
            "text"
        ) from None
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
    return columns, [
        (line, {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}) for line, row in rows
    ]


def _manifest_text(manifest: Path, encoding: str | None) -> str:
    """The manifest's text in ``encoding`` (UTF-8 when ``None``; a UTF-8 byte-order mark is dropped)."""
    try:
        codec = codecs.lookup(encoding or "utf-8").name
    except LookupError:
        raise DataError(
            f"data.manifest_encoding '{encoding}': unknown encoding; give one Python knows, e.g. latin-1 "
            "or cp1252"
        ) from None
    data = manifest.read_bytes()
    try:
        return data.decode("utf-8-sig" if codec == "utf-8" else codec)
    except UnicodeDecodeError as error:
        fix = (
            "set data.manifest_encoding to the file's encoding"
            if encoding
            else "save it as UTF-8 or set data.manifest_encoding (e.g. latin-1 or cp1252)"
        )
        raise DataError(
            f"{manifest}: not {codec} text (byte 0x{data[error.start]:02x} at offset {error.start}); {fix}"
        ) from None


def read_manifest(
    manifest: str | Path,
    image_size: int = 64,
    nifti_slice: int | None = None,
    fractions: Sequence[float] = (0.7, 0.1, 0.2),
    seed: int = 0,
    intensity: IntensityConfig | None = None,
    volume_index: int | None = None,
    duplicates: DuplicatePolicy | None = None,
    encoding: str | None = None,
    streaming: StreamOptions | None = None,
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
        volume_index: the volume of 4D NIfTI files (``data.volume_index``).
        duplicates: ``error`` refuses copies (a row repeated, one image under two labels or in two
            splits, by path and by pixel content), naming both lines; ``keep_first`` keeps the first row;
            ``None`` does not look for them (for callers that audit the data, as ``fewshot-med adapt``).
        encoding: the CSV's text encoding (``data.manifest_encoding``); UTF-8 when ``None``.
        streaming: whether the images are decoded once into the on-disk cache and mapped
            (``fewshot_med.data.cache``); ``None`` streams above ``STREAM_AUTO_BYTES`` of pixels.
    """
    manifest = Path(manifest).expanduser()
    columns, rows = manifest_rows(manifest, encoding)
    paths, origins, labels, groups, split_names = [], [], [], [], []
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
        origins.append(f"{manifest}:{line} ({row['path']})")
        labels.append(row["label"])
        groups.append(row.get("patient_id", ""))
        split_names.append(row.get("split", ""))
    return _build(
        manifest.stem,
        manifest.resolve(),
        paths,
        origins,
        labels,
        groups if "patient_id" in columns else None,
        split_names if "split" in columns else None,
        image_size,
        nifti_slice,
        fractions,
        seed,
        intensity,
        volume_index,
        duplicates,
        streaming,
    )
