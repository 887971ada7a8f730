"""Classifying many files: what a user's paths, folders, globs and manifests name, and a classifier run
over them batch by batch, as the ``fewshot-med predict`` command does."""

from __future__ import annotations

import csv
import glob
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from fewshot_med.data.readers import image_suffix, is_image_file
from fewshot_med.deploy.classifier import FewShotClassifier
from fewshot_med.errors import DataError
from fewshot_med.progress import Progress

if TYPE_CHECKING:
    import pandas as pd

#: Column of a CSV manifest that holds the image paths (relative to the manifest's folder).
MANIFEST_PATH_COLUMN = "path"
_GLOB_CHARACTERS = frozenset("*?[")


def expand_inputs(specs: Sequence[str]) -> list[tuple[str, Path]]:
    """The files that ``specs`` name, in order: ``(the path as the user wrote it, the file)``.

    A folder gives its image files (by suffix, recursively, sorted); a glob its matches (sorted); a
    ``.csv`` file is a manifest whose ``path`` column lists files relative to it (shown as written
    there); anything else is one file, kept even if it is missing or unreadable, so that it gets an
    error row rather than stopping the others.

    Raises:
        DataError: a manifest without a ``path`` column, or nothing to classify at all.
    """
    files: list[tuple[str, Path]] = []
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if is_image_file(p))
            files += [(str(p), p) for p in found]
        elif path.is_file() and image_suffix(path) == ".csv":
            files += _manifest(path)
        elif not path.exists() and _GLOB_CHARACTERS & set(spec):
            files += [(match, Path(match)) for match in sorted(glob.glob(spec, recursive=True))]
        else:
            files.append((spec, path))
    if not files:
        raise DataError(f"no image files in {' '.join(specs)}; give image files, folders, globs or a CSV")
    return files


def _manifest(path: Path) -> list[tuple[str, Path]]:
    """``(path cell, file)`` of every row of a CSV manifest; relative cells are read from its folder."""
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        if MANIFEST_PATH_COLUMN not in (reader.fieldnames or []):
            raise DataError(
                f"{path}: a manifest needs a '{MANIFEST_PATH_COLUMN}' column of image paths "
                f"(relative to its folder); it has {reader.fieldnames}"
            )
        cells = [row[MANIFEST_PATH_COLUMN] for row in reader if row[MANIFEST_PATH_COLUMN]]
    return [(cell, path.parent / cell) for cell in cells]


def predict_files(
    classifier: FewShotClassifier,
    files: Sequence[tuple[str, Path]],
    batch_size: int = 64,
    device: torch.device | None = None,
) -> pd.DataFrame:
    """``classifier.predict_table`` over ``files``, ``batch_size`` files at a time, with progress on
    stderr (``fewshot_med.progress``).

    Returns:
        A ``path`` column (as the user wrote it), then the columns of ``predict_table``, one row per file.
    """
    import pandas as pd

    if batch_size < 1:
        raise DataError(f"--batch-size {batch_size}: give a positive number of images per batch")
    tables = []
    with Progress("predict", total=len(files), unit="image") as progress:
        for start in range(0, len(files), batch_size):
            batch = files[start : start + batch_size]
            tables.append(classifier.predict_table([file for _, file in batch], device))
            progress.update(start + len(batch), force=start + len(batch) == len(files))
    table = pd.concat(tables, ignore_index=True)
    table.insert(0, "path", [shown for shown, _ in files])
    return table


def outcome_counts(table: pd.DataFrame) -> tuple[int, int, int]:
    """``(rows, readable rows that abstained, rows that could not be read)`` of a prediction table."""
    failed = table["error"] != ""
    return len(table), int((table["abstain"] & ~failed).sum()), int(failed.sum())
