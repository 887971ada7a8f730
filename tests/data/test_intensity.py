"""Intensity modes (``data.intensity``): values against hand computation, and CT read in Hounsfield units."""

from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from fewshot_med.config import DataConfig
from fewshot_med.data import LoadOptions, load_dataset
from fewshot_med.data.intensity import IntensityConfig, to_byte_range
from fewshot_med.data.readers import read_image

SOFT_TISSUE = IntensityConfig(mode="window", center=40, width=400)  # Hounsfield -160..240 -> 0..255


def write_ct(path: Path, hounsfield: np.ndarray, slope: int) -> Path:
    """A CT slice storing ``(HU + 1024) / slope`` as uint16, with RescaleIntercept -1024 and the slope."""
    stored = (hounsfield + 1024) / slope
    assert np.array_equal(stored, np.round(stored)) and stored.min() >= 0
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
    ds.Modality, ds.PatientID = "CT", "test"
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, slope, "HU"
    ds.set_pixel_data(stored.astype(np.uint16), "MONOCHROME2", 12)
    ds.save_as(path, enforce_file_format=True)
    return path


def _ct_class(k: int) -> np.ndarray:
    """Class ``k``: top half -80 + 80k HU, bottom half 80 HU less; classes differ only by an offset."""
    hounsfield = np.full((16, 16), -160 + 80 * k)
    hounsfield[:8] += 80
    return hounsfield


@pytest.mark.parametrize("slope", [1, 2])
def test_ct_window_reads_hounsfield_units_and_keeps_classes_apart(tmp_path, slope):
    paths = [write_ct(tmp_path / f"class{k}.dcm", _ct_class(k), slope) for k in range(3)]
    stored = [pydicom.dcmread(path).pixel_array.astype(int) for path in paths]
    assert stored[1][0, 0] - stored[0][0, 0] == 80 // slope  # the raw values are not Hounsfield units
    # soft-tissue window: byte = (HU + 160) / 400 * 255; top/bottom halves of classes 0, 1, 2
    expected = [(51, 0), (102, 51), (153, 102)]
    for path, (top, bottom) in zip(paths, expected, strict=True):
        image = read_image(path, 16, intensity=SOFT_TISSUE)[..., 0]
        assert (image[:8] == top).all() and (image[8:] == bottom).all()
    # the bug of the issue: per-image percentiles (auto) make the three classes identical
    auto = [read_image(path, 16) for path in paths]
    assert np.array_equal(auto[0], auto[1]) and np.array_equal(auto[1], auto[2])
    assert set(np.unique(auto[0])) == {0, 255}


def test_window_and_range_match_hand_computation_and_clip():
    image = torch.tensor([[[-1000.0, -160.0, 40.0, 140.0, 240.0, 1000.0]]])
    expected = torch.tensor([[[0.0, 0.0, 127.5, 191.25, 255.0, 255.0]]])
    torch.testing.assert_close(to_byte_range(image, SOFT_TISSUE, photo=False), expected)
    fixed = IntensityConfig(mode="range", range=(-160, 240))
    torch.testing.assert_close(to_byte_range(image, fixed, photo=True), expected)


def test_percentiles_mode_stretches_photos_too_and_clips():
    image = torch.arange(100, dtype=torch.float32).reshape(1, 10, 10)
    low, high = np.percentile(image.numpy(), (10, 90))
    expected = np.clip((image.numpy() - low) / (high - low) * 255, 0, 255)
    stretched = to_byte_range(image, IntensityConfig(mode="percentiles", percentiles=(10, 90)), photo=True)
    np.testing.assert_allclose(stretched.numpy(), expected, rtol=1e-5, atol=1e-4)
    assert stretched.min() == 0 and stretched.max() == 255 and type(stretched) is torch.Tensor


def test_auto_passes_photos_and_stretches_the_rest_unclipped():
    photo = torch.arange(100, dtype=torch.float32).reshape(1, 10, 10)
    assert torch.equal(to_byte_range(photo, IntensityConfig(), photo=True), photo)
    raw = photo * 40 - 1000  # CT-like values, not a photograph
    low, high = np.percentile(raw.numpy(), (0.5, 99.5))
    expected = (raw.numpy() - low) / (high - low) * 255
    stretched = to_byte_range(raw, IntensityConfig(), photo=False)
    np.testing.assert_allclose(stretched.numpy(), expected, rtol=1e-6, atol=1e-4)
    assert stretched.min() < 0 and stretched.max() > 255  # outliers are clipped only after resizing
    # a photo-like file whose values leave 0..255 (16-bit PNG) is stretched too; percentiles follow the config
    minmax = to_byte_range(raw, IntensityConfig(percentiles=(0, 100)), photo=True)
    np.testing.assert_allclose(minmax.numpy(), (raw.numpy() + 1000) / 3960 * 255, rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("mode", ["auto", "percentiles"])
def test_constant_image_becomes_zero(mode):
    constant = torch.full((1, 4, 4), 700.0)
    assert (to_byte_range(constant, IntensityConfig(mode=mode), photo=False) == 0).all()


def test_data_config_carries_intensity_to_local_folders(tmp_path):
    for scale, split in enumerate(("train", "val", "test"), start=1):
        for k in (0, 2):  # val and test enlarged: identical pixels in two splits would be refused as a leak
            (tmp_path / split / f"class{k}").mkdir(parents=True)
            hounsfield = np.kron(_ct_class(k), np.ones((scale, scale), int))
            write_ct(tmp_path / split / f"class{k}" / "slice.dcm", hounsfield, slope=1)
    config = DataConfig(source=str(tmp_path), image_size=16, intensity=SOFT_TISSUE.model_dump())
    assert config.load_options().intensity == SOFT_TISSUE
    windowed = load_dataset(config.source, config.load_options())
    train = windowed.splits["train"]
    means = {windowed.class_names[y]: x.mean() for x, y in zip(train.images, train.labels, strict=True)}
    assert means == {"class0": pytest.approx(25.5), "class2": pytest.approx(127.5)}
    auto = load_dataset(str(tmp_path), LoadOptions(image_size=16)).splits["train"].images
    assert auto[0].mean() == auto[1].mean() == 127.5


def test_npz_files_are_uint8_already_and_ignore_intensity(tmp_path):
    rng = np.random.default_rng(0)
    splits = ("train", "val", "test")
    arrays = {f"{s}_images": rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8) for s in splits}
    arrays |= {f"{s}_labels": np.arange(3).reshape(-1, 1) for s in splits}
    np.savez(tmp_path / "x.npz", **arrays)
    windowed = load_dataset(str(tmp_path / "x.npz"), LoadOptions(intensity=SOFT_TISSUE))
    assert np.array_equal(windowed.splits["train"].images, arrays["train_images"])
