"""Planted patient data and a search of a whole MLflow store for it (``tests/tracking/test_privacy.py``).

``plant_dataset`` writes a tiny local dataset whose folder, file names, manifest columns and DICOM tags
carry made-up names, ids, a birth date and an institution; ``find_planted`` searches every byte of a
store for them: the SQLite database (raw bytes and the text of every table) and every artifact file,
inside zip/tar/gzip/bz2/xz archives (model archives, ``pt2`` files) recursively, as UTF-8, UTF-16 and
UTF-32 (NumPy string arrays), ignoring case. Pickles keep their strings as bytes, so a raw search finds
them. Any command that writes to a store can be checked with it.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import lzma
import sqlite3
import tarfile
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

#: the folder the images lie in (a physician's name and a department, as hospital exports often have)
FOLDER = "Dr_Jane_Doe_Oncology"
#: the stem every image file name starts with: a patient's name and birth date
FILE_STEM = "JOHNSMITH_19450312"
PATIENT_ID = "MRN99887766"
PATIENT_NAME = "SMITH^JOHN"
PHYSICIAN = "DOE^JANE"
BIRTH_DATE = "19450312"
INSTITUTION = "St Planted Hospital"
#: strings that must never reach a store (each long enough never to occur by chance in binary data)
PLANTED = (
    FOLDER,
    "Jane_Doe",
    FILE_STEM,
    "JOHNSMITH",
    PATIENT_ID,
    PATIENT_NAME,
    PHYSICIAN,
    BIRTH_DATE,
    INSTITUTION,
)

BASE_CLASSES = ("nevus", "melanoma", "keratosis")
NOVEL_CLASSES = ("fibroma", "vascular")
#: images per class in each split (given by the manifest's split column)
PER_SPLIT = {"train": 6, "val": 4, "test": 4}
SIZE = 16


def _dicom(path: Path, pixels: np.ndarray) -> None:
    """A grey DICOM file of ``(H, W)`` uint16 pixels whose tags name the planted patient."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    dataset.SOPClassUID, dataset.SOPInstanceUID = (
        meta.MediaStorageSOPClassUID,
        meta.MediaStorageSOPInstanceUID,
    )
    dataset.PatientName, dataset.PatientID, dataset.PatientBirthDate = PATIENT_NAME, PATIENT_ID, BIRTH_DATE
    dataset.InstitutionName, dataset.ReferringPhysicianName = INSTITUTION, PHYSICIAN
    dataset.StudyDescription = f"{INSTITUTION} dermatology {FILE_STEM}"
    dataset.Modality = "OT"
    dataset.Rows, dataset.Columns = pixels.shape
    dataset.SamplesPerPixel, dataset.PhotometricInterpretation = 1, "MONOCHROME2"
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = 16, 12, 11, 0
    dataset.PixelData = np.ascontiguousarray(pixels, dtype=np.uint16).tobytes()
    dataset.save_as(path, enforce_file_format=True)


def plant_dataset(parent: Path) -> tuple[Path, list[str]]:
    """Write ``parent/FOLDER``: per class and split, ``PER_SPLIT`` images of ``SIZE`` px (even ones PNG,
    odd ones DICOM), named ``<FILE_STEM>_<n>``, and the manifest ``<FILE_STEM>_cases.csv`` with columns
    path,label,patient_id,split. The planted patient's images are in the train split; every image has
    its own patient id otherwise.

    Returns:
        The manifest and the patient ids it lists.
    """
    from PIL import Image

    folder = parent / FOLDER
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows, patients = [], []
    classes = (*BASE_CLASSES, *NOVEL_CLASSES)
    for label, name in enumerate(classes):
        for split, count in PER_SPLIT.items():
            for _ in range(count):
                index = len(rows)
                level = 40 + 40 * label  # each class its own brightness, so that training learns something
                pixels = np.clip(rng.normal(level, 12, (SIZE, SIZE)), 0, 255)
                if index % 2:
                    file = f"{FILE_STEM}_{index:03d}.dcm"
                    _dicom(folder / file, (pixels * 16).astype(np.uint16))
                else:
                    file = f"{FILE_STEM}_{index:03d}.png"
                    Image.fromarray(pixels.astype(np.uint8)).save(folder / file)
                patient = PATIENT_ID if split == "train" and index % 5 == 0 else f"MRN{10000000 + index}"
                rows.append({"path": file, "label": name, "patient_id": patient, "split": split})
                patients.append(patient)
    manifest = folder / f"{FILE_STEM}_cases.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "label", "patient_id", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return manifest, sorted(set(patients))


_ENCODINGS = ("utf-8", "utf-16-le", "utf-16-be", "utf-32-le", "utf-32-be")


def _members(data: bytes) -> Iterator[tuple[str, bytes]]:
    """The files inside an archive or compressed stream (none for other data)."""
    stream = io.BytesIO(data)
    if zipfile.is_zipfile(stream):
        with zipfile.ZipFile(stream) as archive:
            for info in archive.infolist():
                if not info.is_dir():
                    yield info.filename, archive.read(info)
        return
    for magic, decompress in (
        (b"\x1f\x8b", gzip.decompress),
        (b"BZh", bz2.decompress),
        (b"\xfd7zXZ", lzma.decompress),
    ):
        if data.startswith(magic):
            try:
                plain = decompress(data)
            except (OSError, EOFError, ValueError, lzma.LZMAError):  # magic bytes by chance: raw data only
                return
            yield "(decompressed)", plain
            return
    if len(data) > 512 and data[257:262] == b"ustar":
        with tarfile.open(fileobj=stream) as archive:
            for member in archive.getmembers():
                handle = archive.extractfile(member)
                if handle is not None:
                    yield member.name, handle.read()


def _search(data: bytes, where: str, needles: dict[str, list[bytes]], found: list[str]) -> None:
    """Record ``where: string`` for every planted string in ``data`` and in the files inside it."""
    lowered = data.lower()
    found += [f"{where}: {string}" for string, forms in needles.items() if any(f in lowered for f in forms)]
    for name, member in _members(data):
        _search(member, f"{where}!{name}", needles, found)


def _table_texts(database: Path) -> Iterator[tuple[str, str]]:
    """``(table, text of all its rows)`` for every table of a SQLite database."""
    connection = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    try:
        tables = [row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        for table in tables:
            rows = connection.execute(f'SELECT * FROM "{table}"').fetchall()
            yield table, "\n".join(map(repr, rows))
    finally:
        connection.close()


def find_planted(store_dir: Path, strings: Iterable[str]) -> list[str]:
    """Every place under ``store_dir`` that holds one of ``strings``, as ``<file>[!<member>…]: <string>``
    or, for a SQLite table, ``<file>#<table>: <string>``; empty when the store is clean."""
    needles = {s: [s.lower().encode(encoding) for encoding in _ENCODINGS] for s in strings}
    found: list[str] = []
    for path in sorted(p for p in Path(store_dir).rglob("*") if p.is_file()):
        where = str(path.relative_to(store_dir))
        data = path.read_bytes()
        _search(data, where, needles, found)
        if data.startswith(b"SQLite format 3\0"):
            for table, text in _table_texts(path):
                lowered = text.lower()
                found += [f"{where}#{table}: {s}" for s in strings if s.lower() in lowered]
    return found
