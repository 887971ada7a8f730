"""The generated hospital-style demo folder: PNG and DICOM files that read back as the rendered images."""

import csv

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.uid import SecondaryCaptureImageStorage
from typer.testing import CliRunner

from fewshot_med.cli import app
from fewshot_med.data.demo import DEMO_NOVEL_CLASSES
from fewshot_med.data.demo_files import render_demo_images, write_demo_folder, write_secondary_capture
from fewshot_med.data.local import read_image_folder, read_manifest
from fewshot_med.data.readers import read_image
from fewshot_med.errors import DataError


def test_folder_holds_png_and_dicom_files_that_read_back_as_rendered(tmp_path):
    out = write_demo_folder(tmp_path / "clinic", images_per_class=6, image_size=32, seed=1)
    images, labels, patients = render_demo_images(DEMO_NOVEL_CLASSES, 6, 32, seed=1)
    assert sorted(p.name for p in out.iterdir()) == sorted(DEMO_NOVEL_CLASSES)
    for label, name in enumerate(DEMO_NOVEL_CLASSES):
        files = sorted((out / name).iterdir())
        assert [f.suffix for f in files] == [".png", ".dcm"] * 3
        chosen = labels == label
        for file, image, patient in zip(files, images[chosen], patients[chosen], strict=True):
            if file.suffix == ".dcm":
                dataset = pydicom.dcmread(file)
                assert dataset.PhotometricInterpretation == "RGB" and dataset.PatientID == patient
                assert dataset.ConversionType == "SYN" and dataset.SOPClassUID == SecondaryCaptureImageStorage
                assert np.array_equal(dataset.pixel_array, image)
            else:
                assert np.array_equal(np.asarray(Image.open(file)), image)
            assert np.array_equal(read_image(file, 32), image)  # 8-bit DICOM is a photo: passes through
    dataset = read_image_folder(out, image_size=32)
    assert dataset.class_names == tuple(sorted(DEMO_NOVEL_CLASSES))
    read_labels = np.concatenate([split.labels for split in dataset.splits.values()])
    assert np.bincount(read_labels).tolist() == [6, 6, 6]


def test_manifest_lists_every_file_with_its_patient(tmp_path):
    out = write_demo_folder(
        tmp_path / "clinic", ["vascular", "naevus"], images_per_class=10, image_size=16, manifest=True
    )
    with (out / "manifest.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["label"] for row in rows] == ["vascular"] * 10 + ["naevus"] * 10
    assert all((out / row["path"]).is_file() for row in rows)
    _, _, patients = render_demo_images(["vascular", "naevus"], 10, 16, seed=1)
    assert [row["patient_id"] for row in rows] == patients.tolist()
    dataset = read_manifest(out / "manifest.csv", image_size=16)
    assert dataset.class_names == ("naevus", "vascular")
    assert sum(len(split) for split in dataset.splits.values()) == 20
    groups = [set(s.groups) for s in dataset.splits.values()]
    assert not (groups[0] & groups[1] or groups[0] & groups[2] or groups[1] & groups[2])


def test_same_seed_same_files_another_seed_new_images(tmp_path):
    first = write_demo_folder(tmp_path / "a", images_per_class=4, image_size=16, seed=1)
    again = write_demo_folder(tmp_path / "b", images_per_class=4, image_size=16, seed=1)
    for file in first.rglob("*.*"):
        assert file.read_bytes() == (again / file.relative_to(first)).read_bytes()
    images, _, patients = render_demo_images(DEMO_NOVEL_CLASSES, 4, 16, seed=1)
    new_images, _, new_patients = render_demo_images(DEMO_NOVEL_CLASSES, 4, 16, seed=2)
    assert not set(patients) & set(new_patients)
    flat = images.reshape(len(images), -1)
    assert not any((flat == image).all(axis=1).any() for image in new_images.reshape(len(new_images), -1))


def test_grey_secondary_capture_is_monochrome2(tmp_path):
    grey = np.arange(12 * 20, dtype=np.uint8).reshape(12, 20)
    path = write_secondary_capture(tmp_path / "grey.dcm", grey[..., None], "DEMO-7", "grey")
    dataset = pydicom.dcmread(path)
    assert dataset.PhotometricInterpretation == "MONOCHROME2" and dataset.SamplesPerPixel == 1
    assert np.array_equal(dataset.pixel_array, grey)
    with pytest.raises(DataError, match=r"pixels \(4, 4\) of dtype uint16; give \(H, W\[, 3\]\) uint8"):
        write_secondary_capture(tmp_path / "x.dcm", np.zeros((4, 4), np.uint16), "DEMO-7", "x")


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"classes": ["vascualr"]}, r"unknown demo class 'vascualr'; .* did you mean 'vascular'\?"),
        ({"classes": ["actinic", "actinic"]}, "a class is named twice"),
        ({"images_per_class": 0}, r"images_per_class=0: give an integer >= 1"),
        ({"image_size": 8}, r"image_size=8: give an integer >= 16"),
        ({"seed": -1}, r"seed=-1: give an integer >= 0"),
        ({"dicom_fraction": 1.5}, r"dicom_fraction=1.5: give a share between 0 and 1"),
    ],
)
def test_bad_arguments_are_refused(tmp_path, arguments, message):
    with pytest.raises(DataError, match=message):
        write_demo_folder(tmp_path / "out", **arguments)
    assert not (tmp_path / "out").exists()


def test_refuses_a_folder_that_holds_files(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(DataError, match=r"out: exists and is not an empty folder; choose a new folder"):
        write_demo_folder(tmp_path / "out")


def test_cli_writes_the_folder_and_prints_it(tmp_path):
    out = tmp_path / "clinic"
    arguments = ["datasets", "demo-folder", str(out), "--classes", "vascular, actinic", "--per-class", "3"]
    result = CliRunner().invoke(app, [*arguments, "--image-size", "16", "--seed", "5", "--manifest"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == str(out)
    assert sorted(p.name for p in out.iterdir()) == ["actinic", "manifest.csv", "vascular"]
    names = sorted(p.name for p in (out / "actinic").iterdir())
    assert names == ["case_s5_000.png", "case_s5_001.dcm", "case_s5_002.png"]
    failed = CliRunner().invoke(app, ["datasets", "demo-folder", str(tmp_path / "x"), "--classes", "melanom"])
    assert isinstance(failed.exception, DataError) and "did you mean 'melanoma'" in str(failed.exception)
