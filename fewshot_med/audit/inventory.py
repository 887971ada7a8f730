"""What an audit looks at: every image of a folder, a CSV manifest or a loaded array dataset, listed the way
``fewshot_med.data.local`` lists them, but without reading pixels and without stopping at the first bad
file (a missing or odd file becomes a finding, not an error)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fewshot_med.audit.findings import ERROR, INFO, Finding
from fewshot_med.data import SPLITS, LoadOptions, load_dataset
from fewshot_med.data.local import _natural_key, manifest_rows
from fewshot_med.data.readers import image_suffix, is_image_file
from fewshot_med.errors import DataError


@dataclass(frozen=True)
class Item:
    """One image.

    Attributes:
        name: as the user gave it: the manifest's path text, the folder as typed joined with the file's
            place in it, or ``<split>[<row>]`` in an array dataset.
        label: its class name.
        split: ``train``/``val``/``test`` when the data says so, else ``None``.
        patient: its patient (or lesion) id when the data has one, else ``None``.
        path: the file, or ``None`` for an image of an array dataset.
    """

    name: str
    label: str
    split: str | None = None
    patient: str | None = None
    path: Path | None = None


@dataclass(frozen=True)
class Inventory:
    """The listed images of one data source.

    Attributes:
        name: short name (folder name, manifest stem, catalogue name).
        source: the data as the user gave it.
        items: the images, in the order the toolkit reads them.
        class_names: the classes, naturally sorted (``class_names`` of an array dataset as stored).
        findings: what listing found (missing files, files no reader takes).
        images: ``(N, H, W, C)`` uint8 pixels of an array dataset, item by item; ``None`` for files.
        digest: ``MedicalImageDataset.digest`` of an array dataset; ``None`` for files.
    """

    name: str
    source: str
    items: tuple[Item, ...]
    class_names: tuple[str, ...]
    findings: tuple[Finding, ...] = ()
    images: np.ndarray | None = None
    digest: str | None = None

    @property
    def has_files(self) -> bool:
        """Whether the items are files (a folder or a manifest) rather than arrays."""
        return self.images is None

    @property
    def splits_given(self) -> bool:
        return any(item.split is not None for item in self.items)

    @property
    def patients_given(self) -> bool:
        return any(item.patient is not None for item in self.items)


def list_items(source: str | Path, image_size: int | None = None) -> Inventory:
    """List the images of a data source.

    Args:
        source: a folder (``root/<class>/<img>`` or ``root/{train,val,test}/<class>/<img>``), a CSV
            manifest (``path,label[,patient_id][,split]``), or any other spec ``load_dataset`` takes
            (a catalogue name such as ``ham10000``, ``demo``, a ``.npz`` file), whose images are loaded.
        image_size: resize the images of an array dataset to this side (files are read later).

    Raises:
        DataError: the source does not exist or is not laid out as one of these forms.
    """
    text = str(source)
    path = Path(text).expanduser()
    if path.is_dir():
        return _list_folder(text, path)
    if path.suffix.lower() == ".csv":
        return _list_manifest(text, path)
    return _list_arrays(text, image_size)


def _list_folder(text: str, root: Path) -> Inventory:
    """The class folders' files, split folders first when there are any (as ``read_image_folder``)."""
    has_split_folders = any((root / split).is_dir() for split in SPLITS)
    split_roots = [(split, root / split) for split in SPLITS] if has_split_folders else [(None, root)]
    items: list[Item] = []
    findings: list[Finding] = []
    classes: set[str] = set()
    for split, split_root in split_roots:
        class_dirs = [d for d in split_root.iterdir() if d.is_dir()] if split_root.is_dir() else []
        for class_dir in sorted(class_dirs, key=lambda d: _natural_key(d.name)):
            classes.add(class_dir.name)
            files = sorted(
                (f for f in class_dir.rglob("*") if f.is_file() and not f.name.startswith(".")),
                key=lambda f: _natural_key(str(f)),
            )
            for file in files:
                name = str(Path(text) / file.relative_to(root))
                if is_image_file(file):
                    items.append(Item(name, class_dir.name, split, None, file))
                else:
                    detail = f"suffix '{image_suffix(file) or '(none)'}' has no reader; the file is not read"
                    findings.append(Finding(name, "ignored_file", INFO, detail))
    if not classes:
        raise DataError(f"{root}: no class subfolders; put each class's images in its own folder")
    if not items:
        raise DataError(f"{root}: the class folders hold no images the toolkit reads")
    return Inventory(root.name, text, tuple(items), _sorted(classes), tuple(findings))


def _list_manifest(text: str, manifest: Path) -> Inventory:
    """The manifest's rows (as ``read_manifest``); a file that does not exist is a finding."""
    columns, rows = manifest_rows(manifest)
    items: list[Item] = []
    findings: list[Finding] = []
    for line, row in rows:
        if not row["path"] or not row["label"]:
            raise DataError(f"{manifest}:{line}: empty path or label; fill in both")
        split = row.get("split") or None
        if "split" in columns and split not in SPLITS:
            raise DataError(f"{manifest}:{line}: split '{row['split']}' must be one of {list(SPLITS)}")
        file = Path(row["path"]).expanduser()
        file = file if file.is_absolute() else manifest.parent / file
        item = Item(row["path"], row["label"], split, row.get("patient_id") or None, file)
        if file.is_file():
            items.append(item)
        else:
            findings.append(Finding(item.name, "missing_file", ERROR, f"manifest line {line}"))
    if not items:
        raise DataError(f"{manifest}: none of the files it lists exists; fix the paths")
    classes = _sorted({item.label for item in items} | {row["label"] for _, row in rows})
    return Inventory(manifest.stem, text, tuple(items), classes, tuple(findings))


def _list_arrays(text: str, image_size: int | None) -> Inventory:
    """An array dataset (catalogue, demo, ``.npz``) loaded whole; items are ``<split>[<row>]``."""
    dataset = load_dataset(text, LoadOptions(image_size=image_size))
    items: list[Item] = []
    for split in SPLITS:
        part = dataset.splits[split]
        groups = part.groups if part.groups is not None else [None] * len(part)
        items += [
            Item(f"{split}[{row}]", dataset.class_names[label], split, None if group is None else str(group))
            for row, (label, group) in enumerate(zip(part.labels, groups, strict=True))
        ]
    images = np.concatenate([dataset.splits[split].images for split in SPLITS])
    return Inventory(
        dataset.name, text, tuple(items), tuple(dataset.class_names), images=images, digest=dataset.digest
    )


def _sorted(classes: set[str]) -> tuple[str, ...]:
    return tuple(sorted(classes, key=_natural_key))
