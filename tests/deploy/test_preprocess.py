"""Turning paths, encoded bytes and arrays into the classifier's input images; bad inputs become errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fewshot_med.data.intensity import IntensityConfig
from fewshot_med.deploy import Preprocessing, load_inputs
from tests.deploy.conftest import SIZE, dicom_bytes, png_bytes


def test_a_path_its_bytes_and_its_pixels_give_the_same_image(tmp_path, rare):
    image = rare.images[0]
    path = tmp_path / "lesion.png"
    path.write_bytes(png_bytes(image))
    images, errors = load_inputs([str(path), path, png_bytes(image), image], Preprocessing(SIZE, 3))
    assert errors == [None] * 4
    assert images.shape == (4, SIZE, SIZE, 3) and images.dtype == np.uint8
    for got in images:
        np.testing.assert_array_equal(got, image)  # PNG is lossless and already 16 px


def test_images_of_any_size_are_resized(tmp_path):
    colour = np.array([10, 20, 30], dtype=np.uint8)
    large = np.broadcast_to(colour, (30, 40, 3)).copy()
    path = tmp_path / "large.png"
    path.write_bytes(png_bytes(large))
    images, errors = load_inputs([path, large], Preprocessing(SIZE, 3))
    assert errors == [None, None]
    assert images.shape == (2, SIZE, SIZE, 3)
    assert (images == colour).all()  # a flat colour stays that colour whatever the resampling


def test_grey_inputs_are_repeated_for_an_rgb_classifier(tmp_path):
    ramp = np.arange(SIZE * SIZE, dtype=np.uint8).reshape(SIZE, SIZE)
    images, errors = load_inputs([png_bytes(ramp), ramp], Preprocessing(SIZE, 3))
    assert errors == [None, None]
    for image in images:
        for channel in range(3):
            np.testing.assert_array_equal(image[..., channel], ramp)


def test_rgb_inputs_become_luminance_for_a_grey_classifier(tmp_path):
    rgb = np.broadcast_to(np.array([200, 100, 50], dtype=np.uint8), (SIZE, SIZE, 3)).copy()
    images, errors = load_inputs([png_bytes(rgb), rgb], Preprocessing(SIZE, 1))
    assert errors == [None, None]
    assert images.shape == (2, SIZE, SIZE, 1)
    assert (images == 124).all()  # ITU-R 601-2: 0.299 * 200 + 0.587 * 100 + 0.114 * 50 = 124.2


def test_a_dicom_file_and_its_bytes_agree_and_feed_an_rgb_classifier(tmp_path):
    pixels = (np.arange(SIZE * SIZE).reshape(SIZE, SIZE) * 16).astype(np.uint16)  # 12-bit values
    path = tmp_path / "scan.dcm"
    path.write_bytes(dicom_bytes(pixels))
    images, errors = load_inputs([path, path.read_bytes()], Preprocessing(SIZE, 3))
    assert errors == [None, None]
    np.testing.assert_array_equal(images[0], images[1])
    np.testing.assert_array_equal(images[0][..., 0], images[0][..., 2])  # grey, repeated
    assert images[0].max() > images[0].min()  # scaled to bytes, not clipped to one value


def test_unreadable_items_get_one_line_errors_and_keep_the_order(tmp_path, rare):
    good = tmp_path / "good.png"
    good.write_bytes(png_bytes(rare.images[0]))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png at all")
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    items = [good, broken, b"\x89PNG garbage", notes, tmp_path / "missing.png", rare.images[1], 3.5]
    images, errors = load_inputs(items, Preprocessing(SIZE, 3))
    assert [error is None for error in errors] == [True, False, False, False, False, True, False]
    np.testing.assert_array_equal(images, rare.images[:2])  # the readable ones, in order
    for error in filter(None, errors):
        assert error and "\n" not in error
    assert "broken.png" in errors[1] and "notes.txt" in errors[3] and "missing.png" in errors[4]
    assert "float" in errors[6]


def test_nothing_readable_gives_an_empty_batch(tmp_path):
    images, errors = load_inputs([b"junk"], Preprocessing(SIZE, 1))
    assert images.shape == (0, SIZE, SIZE, 1) and images.dtype == np.uint8
    assert errors[0] is not None


def test_preprocessing_round_trips_through_json():
    window = IntensityConfig(mode="window", center=40, width=400)
    preprocessing = Preprocessing(image_size=32, channels=1, intensity=window, nifti_slice=2)
    assert Preprocessing.from_dict(json.loads(json.dumps(preprocessing.to_dict()))) == preprocessing
    assert Preprocessing.from_dict({"image_size": 8, "channels": 3}) == Preprocessing(8, 3)
    with pytest.raises(ValueError, match="channels must be 1 or 3"):
        Preprocessing(image_size=32, channels=2)
