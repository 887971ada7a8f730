"""A generated folder of image files, laid out as a hospital export would be, to try the local-data
workflow (read a folder, adapt to its classes, predict on new files) without any patient data.

The images come from the demo generator (``fewshot_med.data.demo``), drawn from a random stream of their
own, so they are never the images ``make_demo_dataset`` gives a demo backbone to pretrain on; another
seed gives another set of new images. Part of them are written as DICOM secondary captures (pydicom),
the rest as PNG.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from fewshot_med.data.demo import (
    DEMO_CLASS_NAMES,
    DEMO_NOVEL_CLASSES,
    MIN_IMAGE_SIZE,
    _image_params,
    _patients,
    render_in_chunks,
)
from fewshot_med.errors import DataError, not_one_of

#: Mixed into the seed, so a demo folder's random stream is never one of ``make_demo_dataset``'s.
DEMO_FOLDER_STREAM = 0x5EED_F01D
MANIFEST_NAME = "manifest.csv"


def render_demo_images(
    classes: Sequence[str] = DEMO_NOVEL_CLASSES,
    images_per_class: int = 20,
    image_size: int = 64,
    seed: int = 1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render new demo images of the given classes (each patient has 1 to 3 images of one class).

    Args:
        classes: names from ``DEMO_CLASS_NAMES``.
        images_per_class: images of each class, at least 1.
        image_size: side ``S`` of the square images, at least 16.
        seed: non-negative; the same seed gives the same images.

    Returns:
        ``(N, S, S, 3)`` uint8 images, ``(N,)`` int64 indices into ``classes`` (class by class) and
        ``(N,)`` synthetic patient ids ``DEMO-<seed>-<n>``.
    """
    _check_arguments(classes, images_per_class, image_size, seed)
    rng = np.random.default_rng([DEMO_FOLDER_STREAM, seed])
    labels, patients = _patients(rng, [images_per_class] * len(classes))
    table_rows = np.asarray([DEMO_CLASS_NAMES.index(name) for name in classes])[labels]
    params = _image_params(rng, table_rows, patients)
    images = render_in_chunks(rng, params, image_size)
    patient_ids = np.asarray([f"DEMO-{seed}-{patient:04d}" for patient in patients])
    return images, labels, patient_ids


def write_demo_folder(
    out: str | Path,
    classes: Sequence[str] = DEMO_NOVEL_CLASSES,
    images_per_class: int = 20,
    image_size: int = 64,
    seed: int = 1,
    dicom_fraction: float = 0.5,
    manifest: bool = False,
) -> Path:
    """Write ``render_demo_images`` as ``out/<class>/case_s<seed>_<i>.png`` and ``.dcm`` files.

    Within each class every ``1 / dicom_fraction``-th image (``floor(n * dicom_fraction)`` of ``n``) is a
    DICOM secondary capture (``write_secondary_capture``), the others PNG. Call again with another seed
    and another folder for new files of the same classes, e.g. files to predict.

    Args:
        out: a folder that does not exist yet or is empty.
        classes: names from ``DEMO_CLASS_NAMES``; by default the demo's rare classes.
        images_per_class: images of each class, at least 1.
        image_size: side of the square images, at least 16.
        seed: non-negative; the same seed writes the same files.
        dicom_fraction: share of each class written as DICOM, 0 to 1.
        manifest: also write ``out/manifest.csv`` with columns ``path,label,patient_id`` (paths relative
            to ``out``), readable by ``read_manifest``.

    Returns:
        ``out``, readable by ``read_image_folder`` (and ``read_manifest`` when ``manifest``).
    """
    out = Path(out).expanduser()
    if not 0 <= dicom_fraction <= 1:
        raise DataError(f"dicom_fraction={dicom_fraction!r}: give a share between 0 and 1")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out}: exists and is not an empty folder; choose a new folder for the demo files")
    images, labels, patient_ids = render_demo_images(classes, images_per_class, image_size, seed)
    rows = []
    for label, name in enumerate(classes):
        (out / name).mkdir(parents=True)
        for index, row in enumerate(np.flatnonzero(labels == label)):
            as_dicom = np.floor((index + 1) * dicom_fraction) > np.floor(index * dicom_fraction)
            path = out / name / f"case_s{seed}_{index:03d}{'.dcm' if as_dicom else '.png'}"
            if as_dicom:
                key = f"{DEMO_FOLDER_STREAM}/{path.relative_to(out).as_posix()}"
                write_secondary_capture(path, images[row], str(patient_ids[row]), key, index + 1)
            else:
                Image.fromarray(images[row]).save(path)
            rows.append((path.relative_to(out).as_posix(), name, str(patient_ids[row])))
    if manifest:
        with (out / MANIFEST_NAME).open("w", newline="", encoding="utf-8") as handle:
            csv.writer(handle).writerows([("path", "label", "patient_id"), *rows])
    return out


def write_secondary_capture(
    path: Path, pixels: np.ndarray, patient_id: str, key: str, instance_number: int = 1
) -> Path:
    """Write uint8 pixels as a DICOM Secondary Capture Image file with pydicom (>= 3).

    The tags are fake but plausible and identify no one: patient name ``DEMO^SYNTHETIC``, the given
    synthetic patient id, ConversionType ``SYN`` (synthetic image). UIDs derive from ``patient_id``
    (study, series) and ``key`` (instance), so the same arguments write the same file.

    Args:
        path: the ``.dcm`` file to write.
        pixels: ``(H, W, 3)`` uint8 (written RGB) or ``(H, W)``/``(H, W, 1)`` uint8 (MONOCHROME2).
        patient_id: the synthetic patient id.
        key: a text unique to this image.
        instance_number: the image's number within its series.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    pixels = np.asarray(pixels)
    if pixels.ndim == 3 and pixels.shape[-1] == 1:
        pixels = pixels[..., 0]
    if pixels.dtype != np.uint8 or not (pixels.ndim == 2 or (pixels.ndim == 3 and pixels.shape[-1] == 3)):
        raise DataError(f"{path}: pixels {pixels.shape} of dtype {pixels.dtype}; give (H, W[, 3]) uint8")
    dataset = Dataset()
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset.SOPClassUID = SecondaryCaptureImageStorage
    dataset.SOPInstanceUID = generate_uid(entropy_srcs=[key, "instance"])
    dataset.StudyInstanceUID = generate_uid(entropy_srcs=[patient_id, "study"])
    dataset.SeriesInstanceUID = generate_uid(entropy_srcs=[patient_id, "series"])
    dataset.PatientName = "DEMO^SYNTHETIC"
    dataset.PatientID = patient_id
    dataset.PatientBirthDate = ""
    dataset.PatientSex = ""
    dataset.PatientIdentityRemoved = "YES"
    dataset.StudyDate, dataset.StudyTime = "20240101", "120000"
    dataset.AccessionNumber = ""
    dataset.ReferringPhysicianName = ""
    dataset.StudyID = "1"
    dataset.Modality = "OT"
    dataset.SeriesNumber = 1
    dataset.InstanceNumber = instance_number
    dataset.ConversionType = "SYN"
    dataset.Manufacturer = "fewshot-med demo generator"
    dataset.BurnedInAnnotation = "NO"
    dataset.ImageComments = "synthetic image, no patient"
    photometric = "RGB" if pixels.ndim == 3 else "MONOCHROME2"
    dataset.set_pixel_data(pixels, photometric, bits_stored=8, generate_instance_uid=False)
    dataset.save_as(path, enforce_file_format=True)
    return path


def _check_arguments(classes: Sequence[str], images_per_class: int, image_size: int, seed: int) -> None:
    """Raise ``DataError`` for unknown or repeated classes and out-of-range counts."""
    if isinstance(classes, str) or not classes:
        raise DataError(f"classes={classes!r}: give a list of names from {', '.join(DEMO_CLASS_NAMES)}")
    for name in classes:
        if name not in DEMO_CLASS_NAMES:
            raise DataError(not_one_of(name, "demo class", DEMO_CLASS_NAMES))
    if len(set(classes)) != len(classes):
        raise DataError(f"classes {list(classes)}: a class is named twice; name each once")
    for argument, value, minimum in (
        ("images_per_class", images_per_class, 1),
        ("image_size", image_size, MIN_IMAGE_SIZE),
        ("seed", seed, 0),
    ):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
            raise DataError(f"{argument}={value!r}: give an integer >= {minimum}")
