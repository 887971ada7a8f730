"""Local folders and CSV manifests, on PNG/JPEG/DICOM/NIfTI files written by the tests."""

import itertools
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from fewshot_med.data import load_dataset
from fewshot_med.data.local import read_image_folder, read_manifest
from fewshot_med.data.readers import read_image
from fewshot_med.errors import DataError


def _top_bright(height: int, width: int, value: int, dtype=np.uint8) -> np.ndarray:
    """An image whose top quarter is bright: checks that rows stay rows after reading."""
    image = np.zeros((height, width), dtype=dtype)
    image[: height // 4] = value
    return image


def write_dicom(path: Path, pixels: np.ndarray) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit, ds.PixelRepresentation, ds.SamplesPerPixel = 15, 0, 1
    ds.PhotometricInterpretation, ds.Modality = "MONOCHROME2", "OT"
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def test_png_keeps_orientation_and_resizes(tmp_path):
    path = tmp_path / "x.png"
    rgb = np.stack([_top_bright(40, 60, 200)] * 3, axis=-1)
    Image.fromarray(rgb).save(path)
    image = read_image(path, image_size=16)
    assert image.shape == (16, 16, 3) and image.dtype == np.uint8
    assert image[:3].mean() > 150 and image[-8:].max() == 0


def test_dicom_16bit_is_scaled_and_not_transposed(tmp_path):
    path = write_dicom(tmp_path / "x.dcm", _top_bright(40, 60, 4000, np.uint16))
    image = read_image(path, image_size=20)
    assert image.shape == (20, 20, 1)
    assert image[0].min() == 255 and image[-1].max() == 0


def test_nifti_takes_middle_or_chosen_slice(tmp_path):
    volume = np.zeros((20, 20, 5), dtype=np.float32)
    volume[10:, :, 2] = 1.0  # middle slice: bottom half bright
    volume[:5, :, 4] = 3.0  # last slice: top rows bright
    path = tmp_path / "v.nii.gz"
    nib.save(nib.Nifti1Image(volume, np.eye(4)), path)
    middle = read_image(path, 20)
    assert middle[10:].min() == 255 and middle[:10].max() == 0
    last = read_image(path, 20, nifti_slice=4)
    assert last[:5].min() == 255 and last[5:].max() == 0
    with pytest.raises(DataError, match="slice 9 is outside the volume's 5 slices"):
        read_image(path, 20, nifti_slice=9)


def _make_folder(root: Path, per_class: int = 12) -> None:
    rng = np.random.default_rng(0)
    for name in ("benign", "malignant"):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"img{i}.{'png' if i % 2 else 'jpg'}")


def test_folder_of_classes_is_split_by_fraction(tmp_path):
    _make_folder(tmp_path / "derm")
    dataset = read_image_folder(tmp_path / "derm", image_size=16, seed=0)
    assert dataset.class_names == ("benign", "malignant")
    assert dataset.image_shape == (16, 16, 3)
    sizes = {s: len(dataset.splits[s]) for s in ("train", "val", "test")}
    assert sum(sizes.values()) == 24 and min(sizes.values()) >= 1
    assert dataset.digest == read_image_folder(tmp_path / "derm", image_size=16, seed=0).digest


def test_folder_with_split_subfolders_and_mixed_grey_rgb(tmp_path):
    for side, (split, name) in enumerate(itertools.product(("train", "val", "test"), ("a", "b")), start=8):
        (tmp_path / split / name).mkdir(parents=True)  # sizes differ: identical pixels would be copies
        Image.fromarray(np.full((side, side), 50, np.uint8)).save(tmp_path / split / name / "grey.png")
        Image.fromarray(np.full((side, side, 3), 90, np.uint8)).save(tmp_path / split / name / "rgb.png")
    dataset = load_dataset(str(tmp_path))
    assert [len(dataset.splits[s]) for s in ("train", "val", "test")] == [4, 4, 4]
    assert dataset.image_shape == (64, 64, 3)
    assert sorted(np.unique(dataset.splits["train"].images).tolist()) == [50, 90]


def test_empty_class_folder_is_named(tmp_path):
    _make_folder(tmp_path / "derm")
    (tmp_path / "derm" / "rare").mkdir()
    with pytest.raises(DataError, match=r"derm/rare: class folder holds no images"):
        read_image_folder(tmp_path / "derm")


def test_corrupt_and_truncated_images_are_named(tmp_path):
    _make_folder(tmp_path / "derm")
    (tmp_path / "derm" / "benign" / "broken.png").write_bytes(b"not a png at all")
    with pytest.raises(DataError, match=r"broken\.png: cannot read this pil image"):
        read_image_folder(tmp_path / "derm")
    (tmp_path / "derm" / "benign" / "broken.png").unlink()
    good = (tmp_path / "derm" / "benign" / "img1.png").read_bytes()
    (tmp_path / "derm" / "benign" / "cut.png").write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match=r"cut\.png: cannot read"):
        read_image_folder(tmp_path / "derm")


def test_unreadable_dicom_is_named(tmp_path):
    (tmp_path / "bad.dcm").write_bytes(b"DICM" * 20)
    with pytest.raises(DataError, match=r"bad\.dcm: cannot read this dicom image"):
        read_image(tmp_path / "bad.dcm", 16)


def _manifest(tmp_path: Path, rows: list[str], header: str = "path,label,patient_id") -> Path:
    path = tmp_path / "manifest.csv"
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def test_manifest_with_patients_never_leaks_a_patient(tmp_path):
    (tmp_path / "img").mkdir()
    rows = []
    for i in range(120):
        patient, label = f"p{i // 3}", ["nv", "mel", "df"][(i // 3) % 3]
        name = f"img/{i}.dcm"
        write_dicom(tmp_path / name, np.full((12, 12), i, np.uint16))
        rows.append(f"{name},{label},{patient}")
    dataset = read_manifest(_manifest(tmp_path, rows), image_size=12, seed=3)
    assert dataset.class_names == ("df", "mel", "nv")
    patients = {s: set(dataset.splits[s].groups) for s in ("train", "val", "test")}
    assert not patients["train"] & patients["val"]
    assert not patients["train"] & patients["test"]
    assert not patients["val"] & patients["test"]
    assert sum(len(p) for p in patients.values()) == 40


def test_manifest_split_column_is_checked_for_leaks(tmp_path):
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "a.png")
    rows = ["a.png,x,p1,train", "a.png,y,p1,test", "a.png,x,p2,val", "a.png,y,p3,val"]
    path = _manifest(tmp_path, rows, header="path,label,patient_id,split")
    with pytest.raises(DataError, match=r"patient 'p1' is in splits \['test', 'train'\]"):
        read_manifest(path)


@pytest.mark.parametrize(
    ("header", "rows", "message"),
    [
        ("path,diagnosis", ["a.png,x"], r"missing column\(s\) \['label'\]"),
        ("path,label,age", ["a.png,x,3"], r"unknown column\(s\) \['age'\]"),
        ("path,label", ["missing.png,x"], r"manifest\.csv:2: image .*missing\.png does not exist"),
        ("path,label,split", ["a.png,x,holdout"], r"manifest\.csv:2: split 'holdout' must be one of"),
        ("path,label", [], "lists no images"),
    ],
)
def test_manifest_errors_name_file_and_line(tmp_path, header, rows, message):
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "a.png")
    with pytest.raises(DataError, match=message):
        read_manifest(_manifest(tmp_path, rows, header=header))
