"""One image, three ways in: a file path, the file's bytes, the array of its pixels. Same uint8 output."""

import gzip
import tempfile
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset

from fewshot_med.data.intensity import IntensityConfig
from fewshot_med.data.readers import _load, decode_image, prepare_array, read_image, sniff_format
from fewshot_med.errors import DataError
from tests.data.test_local import write_dicom

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (30, 45, 3), dtype=np.uint8)
GREY16 = RNG.integers(300, 4000, (30, 45)).astype(np.uint16)
WINDOW = IntensityConfig(mode="window", center=1000, width=2000)  # raw 0..2000 -> 0..255


def _pil_file(tmp_path: Path, pixels: np.ndarray, suffix: str) -> Path:
    path = tmp_path / f"image{suffix}"
    Image.fromarray(pixels).save(path)
    return path


@pytest.mark.parametrize(
    ("pixels", "suffix"),
    [(RGB, ".png"), (GREY16, ".png"), (RGB, ".bmp"), (RGB, ".tif"), (RGB, ".jpg")],
)
def test_path_bytes_and_decoded_array_give_the_same_image(tmp_path, pixels, suffix):
    path = _pil_file(tmp_path, pixels, suffix)
    decoded = np.asarray(Image.open(path))
    for intensity in (None, IntensityConfig(mode="percentiles"), WINDOW):
        by_path = read_image(path, 20, intensity=intensity)
        assert by_path.shape == (20, 20, 3 if pixels.ndim == 3 else 1) and by_path.dtype == np.uint8
        assert np.array_equal(decode_image(path.read_bytes(), 20, intensity=intensity), by_path)
        assert np.array_equal(prepare_array(decoded, 20, intensity), by_path)


#: Pillow images of every mode a medical PNG, JPEG, BMP or TIFF file is likely to hold, by file name.
PIL_MODES = {
    "grey.png": Image.fromarray(RGB[..., 0]),
    "rgb.png": Image.fromarray(RGB),
    "rgba.png": Image.fromarray(np.dstack([RGB, RGB[..., :1]])),
    "grey_alpha.png": Image.fromarray(RGB[..., 0]).convert("LA"),
    "palette.png": Image.fromarray(RGB).convert("P"),
    "bilevel.png": Image.fromarray(RGB[..., 0]).convert("1"),
    "grey16.png": Image.fromarray(GREY16),
    "grey16.tif": Image.fromarray(GREY16),
    "int32.tif": Image.fromarray(GREY16.astype(np.int32) - 500),
    "float.tif": Image.fromarray(RNG.normal(size=(30, 45)).astype(np.float32)),
    "rgb.tif": Image.fromarray(RGB),
    "rgb.jpg": Image.fromarray(RGB),
    "grey.jpg": Image.fromarray(RGB[..., 0]),
    "cmyk.jpg": Image.fromarray(RGB).convert("CMYK"),
    "rgb.bmp": Image.fromarray(RGB),
    "palette.bmp": Image.fromarray(RGB).convert("P"),
}


@pytest.mark.parametrize("name", sorted(PIL_MODES))
def test_pillow_files_read_as_monais_pil_reader_reads_them(tmp_path, name):
    from monai.data import PILReader
    from monai.transforms import LoadImage

    path = tmp_path / name
    PIL_MODES[name].save(path)
    with warnings.catch_warnings():
        # e.g. torch's warning on a read-only array, given once per process: read before MONAI does
        warnings.simplefilter("error")
        got = _load(path, "pil")
    reader = PILReader(reverse_indexing=False)
    expected = LoadImage(reader=reader, image_only=True, ensure_channel_first=True, dtype=None)(
        str(path), reader=reader
    ).as_tensor()
    assert type(got) is torch.Tensor and got.dtype == expected.dtype and torch.equal(got, expected)


def test_rgba_png_drops_alpha_every_way(tmp_path):
    rgba = np.concatenate([RGB, np.full((30, 45, 1), 128, np.uint8)], axis=-1)
    path = _pil_file(tmp_path, rgba, ".png")
    (tmp_path / "rgb").mkdir()
    expected = read_image(_pil_file(tmp_path / "rgb", RGB, ".png"), 16)
    assert np.array_equal(read_image(path, 16), expected)
    assert np.array_equal(decode_image(path.read_bytes(), 16), expected)
    assert np.array_equal(prepare_array(rgba, 16), expected)


def test_uint8_arrays_pass_through_and_other_dtypes_follow_the_mode():
    assert np.array_equal(prepare_array(RGB[:16, :16], 16), RGB[:16, :16])
    assert np.array_equal(prepare_array(RGB[:16, :16, 0], 16), RGB[:16, :16, :1])
    as_float = prepare_array(RGB[:16, :16].astype(np.float32) / 255, 16)  # float in [0, 1]: stretched
    low, high = np.percentile(RGB[:16, :16] / 255, (0.5, 99.5))
    expected = np.clip(np.round((RGB[:16, :16] / 255 - low) / (high - low) * 255), 0, 255)
    assert np.abs(as_float.astype(int) - expected).max() <= 1
    assert np.array_equal(prepare_array(GREY16[:16, :16, None], 16), prepare_array(GREY16[:16, :16], 16))


def test_dicom_path_bytes_bare_dataset_and_pixel_array_agree(tmp_path):
    path = write_dicom(tmp_path / "x.dcm", GREY16)
    dataset = pydicom.dcmread(path)
    bare = DicomBytesIO()  # no preamble, no file meta: a dataset as sent over the network
    bare.is_little_endian, bare.is_implicit_VR = True, True
    write_dataset(bare, dataset)
    assert bare.getvalue()[128:132] != b"DICM" and sniff_format(bare.getvalue()) == ".dcm"
    for intensity in (None, WINDOW):
        by_path = read_image(path, 24, intensity=intensity)
        assert np.array_equal(decode_image(path.read_bytes(), 24, intensity=intensity), by_path)
        assert np.array_equal(decode_image(bare.getvalue(), 24, intensity=intensity), by_path)
        assert np.array_equal(prepare_array(dataset.pixel_array, 24, intensity), by_path)
    square = write_dicom(tmp_path / "square.dcm", GREY16[:, :30])
    windowed = read_image(square, 30, intensity=WINDOW)[..., 0]  # not resized: value / 2000 * 255, clipped
    assert np.array_equal(windowed, np.clip(np.round(GREY16[:, :30] / 2000 * 255), 0, 255))


def test_8bit_rgb_dicom_reads_like_the_png_of_its_pixels(tmp_path):
    from fewshot_med.data.demo_files import write_secondary_capture

    dicom = write_secondary_capture(tmp_path / "photo.dcm", RGB, "DEMO-0", "key")
    assert np.array_equal(read_image(dicom, 45), read_image(_pil_file(tmp_path, RGB, ".png"), 45))
    assert np.array_equal(read_image(dicom, 20), read_image(_pil_file(tmp_path, RGB, ".png"), 20))


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_nifti_bytes_match_the_file_and_pick_the_slice(tmp_path, suffix):
    volume = RNG.normal(0, 100, (20, 24, 5)).astype(np.float32)
    path = tmp_path / f"v{suffix}"
    nib.save(nib.Nifti1Image(volume, np.eye(4)), path)
    assert sniff_format(path.read_bytes()) == suffix
    for nifti_slice in (None, 4):
        expected = read_image(path, 16, nifti_slice)
        assert np.array_equal(decode_image(path.read_bytes(), 16, nifti_slice), expected)
    assert not np.array_equal(read_image(path, 16), read_image(path, 16, 4))


@pytest.mark.parametrize(
    ("data", "suffix"),
    [
        (b"\x89PNG\r\n\x1a\n" + bytes(20), ".png"),
        (b"\xff\xd8\xff\xe0" + bytes(20), ".jpg"),
        (b"II*\x00" + bytes(20), ".tif"),
        (b"MM\x00*" + bytes(20), ".tif"),
        (b"BM" + bytes(20), ".bmp"),
        (bytes(128) + b"DICM" + bytes(20), ".dcm"),
        (bytes(344) + b"n+1\x00" + bytes(8), ".nii"),
        (gzip.compress(bytes(344) + b"n+1\x00" + bytes(8), mtime=0), ".nii.gz"),
        (gzip.compress(b"path,label\na.png,x\n", mtime=0), None),
        (b"%PDF-1.7 " + bytes(400), None),
        (b"", None),
    ],
)
def test_sniff_format_reads_magic_numbers(data, suffix):
    assert sniff_format(data) == suffix


def test_unrecognised_empty_and_truncated_bytes_are_one_line_errors(tmp_path):
    with pytest.raises(DataError, match=r"^bytes #3: not a PNG, JPEG, DICOM or NIfTI image \(empty\)"):
        decode_image(b"", 16, name="bytes #3")
    with pytest.raises(DataError, match=r"^bytes: not a PNG, .* \(23 bytes with an unknown header\)"):
        decode_image(b"name,age\nsomeone,42\n\x00\x00\x00", 16)
    with pytest.raises(DataError, match=r"\(\d+ bytes of gzip data that is not a NIfTI volume\)"):
        decode_image(gzip.compress(b"hello"), 16)
    png = _pil_file(tmp_path, RGB, ".png").read_bytes()
    dicom = write_dicom(tmp_path / "x.dcm", GREY16).read_bytes()
    nib.save(nib.Nifti1Image(RNG.random((32, 32, 8), np.float32), np.eye(4)), tmp_path / "v.nii.gz")
    nifti = (tmp_path / "v.nii.gz").read_bytes()
    for data, suffix in ((png, ".png"), (dicom, ".dcm"), (nifti, ".nii.gz")):
        message = rf"^upload: not a .* image \(truncated or corrupt \{suffix} file: "
        with pytest.raises(DataError, match=message):
            decode_image(data[: len(data) // 2], 16, name="upload")


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".tif", ".dcm", ".nii.gz"])
@pytest.mark.parametrize("content", [b"", b"\x00\x01garbage"])
def test_empty_or_garbage_files_give_a_data_error_naming_the_file(tmp_path, suffix, content):
    path = tmp_path / f"scan{suffix}"
    path.write_bytes(content)
    message = rf"scan\{suffix}: cannot read this \w+ image \(.+\); replace or remove"
    with pytest.raises(DataError, match=message):
        read_image(path, 16)


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.zeros((8, 8, 2)), r"array of shape \(8, 8, 2\); give \(H, W\)"),
        (np.zeros((2, 8, 8, 3)), r"array of shape \(2, 8, 8, 3\)"),
        (np.zeros((0, 8)), r"array of shape \(0, 8, 1\)"),
        (np.zeros((8, 8), dtype=complex), r"array of dtype complex128; give integer or float"),
        (np.full((8, 8), np.nan), r"array: image holds NaN or infinite values"),
    ],
)
def test_bad_arrays_are_refused(array, message):
    with pytest.raises(DataError, match=message):
        prepare_array(array, 8)


def test_decoding_leaves_no_temporary_files(tmp_path):
    before = set(Path(tempfile.gettempdir()).glob("fewshot-med-decode-*"))
    decode_image(_pil_file(tmp_path, RGB, ".png").read_bytes(), 8)
    assert set(Path(tempfile.gettempdir()).glob("fewshot-med-decode-*")) == before
