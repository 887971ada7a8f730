"""A small image collection with planted problems, written once per session as PNG files plus a manifest
(``path,label,patient_id,split``), and an empty MLflow store to copy per test."""

from __future__ import annotations

import csv
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fewshot_med.data.demo import make_demo_dataset

N_FLIPS = 10
#: Images taken per class from each demo split (about 200 in all).
PER_SPLIT = {"train": 17, "val": 3, "test": 5}


@dataclass
class Planted:
    """Where the collection lies and what was planted (manifest path texts).

    Attributes:
        root: the folder holding ``images/`` and ``manifest.csv``.
        manifest: the manifest.
        rows: the manifest rows (path, label, patient_id, split).
        duplicate: ``(copy, original)`` of an exact copy in the same class, split and patient.
        conflict: ``(copy, original)`` of an exact copy under another label.
        split_leak: ``(copy in test, original in train)``.
        patient_leak: ``(image moved to test, an image of the same patient left in train)``.
        truncated, text_as_png, tiny: the broken or odd files.
        flips: the images whose manifest label was changed to another class.
    """

    root: Path
    manifest: Path
    rows: list[dict[str, str]]
    duplicate: tuple[str, str]
    conflict: tuple[str, str]
    split_leak: tuple[str, str]
    patient_leak: tuple[str, str]
    truncated: str
    text_as_png: str
    tiny: str
    flips: list[str] = field(default_factory=list)

    @property
    def planted_names(self) -> list[str]:
        """Every file name the collection holds (for privacy checks)."""
        return [Path(row["path"]).name for row in self.rows]


def _save(root: Path, relative: str, pixels: np.ndarray) -> str:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return relative


def _copy(root: Path, source: str, relative: str) -> str:
    (root / relative).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(root / source, root / relative)
    return relative


@pytest.fixture(scope="session")
def planted(tmp_path_factory: pytest.TempPathFactory) -> Planted:
    """25 demo images (32 px) per class (17 train, 3 val, 5 test; fewer where the demo split holds fewer),
    8 classes, each with its demo patient and split, plus: an exact copy
    within a class, a copy under another label, a copy of a train image in test, one image of a
    multi-image patient moved to test, a truncated PNG, a text file named .png, a 12 px image, and 10
    label flips (seeded)."""
    root = tmp_path_factory.mktemp("ward7_scans")
    demo = make_demo_dataset(seed=0, image_size=32, images_per_common_class=40, images_per_rare_class=40)
    rows: list[dict[str, str]] = []
    for split, quota in PER_SPLIT.items():
        part = demo.splits[split]
        taken = dict.fromkeys(range(len(demo.class_names)), 0)
        for index, (image, label, patient) in enumerate(
            zip(part.images, part.labels, part.groups, strict=True)
        ):
            if taken[int(label)] >= quota:
                continue
            taken[int(label)] += 1
            name = demo.class_names[label]
            path = _save(root, f"images/{name}/{split}_{index:03d}.png", image)
            rows.append({"path": path, "label": name, "patient_id": str(patient), "split": split})
    rng = np.random.default_rng(7)
    train = [row for row in rows if row["split"] == "train"]
    first, second, third = (train[i] for i in rng.choice(len(train), 3, replace=False))
    other = next(name for name in demo.class_names if name != second["label"])
    planted = {
        "duplicate": {**first, "path": _copy(root, first["path"], f"images/{first['label']}/copy_of_a.png")},
        "conflict": {
            **second,
            "label": other,
            "path": _copy(root, second["path"], f"images/{other}/b_again.png"),
        },
        "split_leak": {
            **third,
            "split": "test",
            "patient_id": "patient-new-1",
            "path": _copy(root, third["path"], f"images/{third['label']}/c_in_test.png"),
        },
    }
    patients: dict[str, list[dict[str, str]]] = {}
    for row in train:
        patients.setdefault(row["patient_id"], []).append(row)
    moved, kept = next(
        group
        for group in patients.values()
        if len(group) >= 2 and not {first["path"], second["path"], third["path"]} & {r["path"] for r in group}
    )[:2]
    moved["split"] = "test"
    broken = root / "images" / "broken"
    broken.mkdir()
    png = (root / rows[0]["path"]).read_bytes()
    (broken / "truncated.png").write_bytes(png[: len(png) // 2])
    (broken / "notes.png").write_text("ward round notes, not an image\n")
    _save(root, "images/broken/tiny.png", np.full((12, 12, 3), 128, dtype=np.uint8))
    odd = [
        {
            "path": f"images/broken/{name}",
            "label": rows[0]["label"],
            "patient_id": f"patient-odd-{i}",
            "split": "train",
        }
        for i, name in enumerate(("truncated.png", "notes.png", "tiny.png"))
    ]
    untouched = [row for row in rows if row not in (first, second, third, moved, kept)]
    flips = [untouched[i] for i in rng.choice(len(untouched), N_FLIPS, replace=False)]
    for row in flips:
        row["label"] = str(rng.choice([name for name in demo.class_names if name != row["label"]]))
    rows += [*planted.values(), *odd]
    manifest = root / "manifest.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "label", "patient_id", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return Planted(
        root=root,
        manifest=manifest,
        rows=rows,
        duplicate=(planted["duplicate"]["path"], first["path"]),
        conflict=(planted["conflict"]["path"], second["path"]),
        split_leak=(planted["split_leak"]["path"], third["path"]),
        patient_leak=(moved["path"], kept["path"]),
        truncated=odd[0]["path"],
        text_as_png=odd[1]["path"],
        tiny=odd[2]["path"],
        flips=[row["path"] for row in flips],
    )


@pytest.fixture
def store(tmp_path: Path, empty_store: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A store folder (copy of the empty database) that ``$MLFLOW_TRACKING_URI`` points to."""
    folder = tmp_path / "store"
    folder.mkdir()
    shutil.copy(empty_store, folder / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", str(folder))
    return folder
