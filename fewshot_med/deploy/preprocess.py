"""What a deployed classifier does to a file before the backbone sees it: the same reading, intensity
handling, resizing and channels as the data it was fitted on, so a file, its encoded bytes and the
array of its pixels all get the same answer."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from fewshot_med.data.intensity import IntensityConfig
from fewshot_med.data.readers import decode_image, prepare_array, read_image
from fewshot_med.errors import DataError

#: One input of a classifier: a file path, the encoded bytes of a file, or an image array.
InputItem = str | os.PathLike | bytes | np.ndarray


@dataclass(frozen=True)
class Preprocessing:
    """How inputs become the uint8 images a classifier was fitted on.

    Attributes:
        image_size: output height and width (the whole image is resized, not cropped).
        channels: 1 or 3, the channels of the uint8 images the classifier was fitted on; grey inputs
            are repeated to 3 channels, RGB inputs become grey by luminance (PIL's ITU-R 601-2 ``L``).
        intensity: how file pixel values become 0..255 (the ``data.intensity`` config section).
        nifti_slice: slice of 3D volumes along the last axis; ``None`` takes the middle one.
    """

    image_size: int
    channels: int
    intensity: IntensityConfig = field(default_factory=IntensityConfig)
    nifti_slice: int | None = None

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ValueError(f"Preprocessing.channels must be 1 or 3, got {self.channels}")
        if self.image_size < 1:
            raise ValueError(f"Preprocessing.image_size must be positive, got {self.image_size}")

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form, stored in a logged model's metadata."""
        return {
            "image_size": self.image_size,
            "channels": self.channels,
            "intensity": self.intensity.model_dump(mode="json"),
            "nifti_slice": self.nifti_slice,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Preprocessing:
        """Inverse of ``to_dict``."""
        return cls(
            image_size=int(data["image_size"]),
            channels=int(data["channels"]),
            intensity=IntensityConfig.model_validate(data.get("intensity") or {}),
            nifti_slice=data.get("nifti_slice"),
        )


def load_inputs(
    items: Sequence[InputItem], preprocessing: Preprocessing
) -> tuple[np.ndarray, list[str | None]]:
    """Read, decode or prepare each item as the classifier's training images were.

    Paths go through ``read_image``, bytes through ``decode_image`` and arrays (``(H, W)`` or
    ``(H, W, C)``, any size and dtype) through ``prepare_array``; folders are not expanded here.

    Args:
        items: N inputs, each a path (``str`` or ``PathLike``), the bytes of an encoded file
            (PNG, JPEG, DICOM, ...) or an image array.
        preprocessing: size, channels, intensity handling and NIfTI slice.

    Returns:
        ``(M, S, S, C)`` uint8 images of the M readable items, in order (``C`` =
        ``preprocessing.channels``), and per item ``None`` or the one-line reason it could not be read.
    """
    images, errors = [], []
    for index, item in enumerate(items):
        try:
            images.append(_with_channels(_load_one(item, index, preprocessing), preprocessing.channels))
            errors.append(None)
        except DataError as error:
            errors.append(str(error).splitlines()[0])
    size, channels = preprocessing.image_size, preprocessing.channels
    stacked = np.stack(images) if images else np.zeros((0, size, size, channels), dtype=np.uint8)
    return stacked, errors


def _load_one(item: InputItem, index: int, preprocessing: Preprocessing) -> np.ndarray:
    """Item ``index`` as an ``(S, S, C)`` uint8 image, ``C`` as read (1 or 3); errors about bytes and
    arrays call it ``input #<index>``, errors about a file name the file."""
    size, intensity, label = preprocessing.image_size, preprocessing.intensity, f"input #{index}"
    if isinstance(item, (bytes, bytearray, memoryview)):
        return decode_image(bytes(item), size, preprocessing.nifti_slice, intensity, name=label)
    if isinstance(item, (str, os.PathLike)):
        return read_image(Path(item), size, preprocessing.nifti_slice, intensity)
    if isinstance(item, np.ndarray):
        return prepare_array(item, size, intensity, name=label)
    raise DataError(
        f"{label}: a {type(item).__name__} is no image; give a file path, an image file's bytes or an array"
    )


def _with_channels(image: np.ndarray, channels: int) -> np.ndarray:
    """``(S, S, c)`` uint8 -> ``(S, S, channels)``: grey repeated to RGB, RGB to grey by luminance."""
    if image.shape[-1] == channels:
        return image
    if channels == 3:
        return np.repeat(image, 3, axis=-1)
    return np.asarray(Image.fromarray(np.ascontiguousarray(image)).convert("L"))[..., None]
