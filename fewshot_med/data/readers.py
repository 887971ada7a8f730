"""Reading single image files (PNG, JPEG, BMP, TIFF, DICOM, NIfTI) through MONAI's readers."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from functools import cache
from pathlib import Path

import numpy as np
import torch

from fewshot_med.errors import DataError

#: File suffix -> name of the MONAI reader that opens it.
READER_BY_SUFFIX: dict[str, str] = {
    ".png": "pil",
    ".jpg": "pil",
    ".jpeg": "pil",
    ".bmp": "pil",
    ".tif": "pil",
    ".tiff": "pil",
    ".dcm": "dicom",
    ".dicom": "dicom",
    ".nii": "nifti",
    ".nii.gz": "nifti",
}


def image_suffix(path: Path) -> str:
    """Return the suffix that selects a reader (``.nii.gz`` counts as one suffix)."""
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def is_image_file(path: Path) -> bool:
    """Whether ``path`` has a suffix this toolkit can read."""
    return path.is_file() and image_suffix(path) in READER_BY_SUFFIX


@cache
def _loader(kind: str) -> Callable[[str], torch.Tensor]:
    """Build (once) the MONAI ``LoadImage`` for a reader kind; MONAI is imported lazily."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*nvImageCodec.*")
        from monai.data import NibabelReader, PILReader, PydicomReader
        from monai.transforms import LoadImage

    readers = {
        "pil": lambda: PILReader(reverse_indexing=False),
        "dicom": lambda: PydicomReader(swap_ij=False),
        "nifti": lambda: NibabelReader(),
    }
    return LoadImage(reader=readers[kind](), image_only=True, ensure_channel_first=True)


def _scale_to_byte_range(image: torch.Tensor, kind: str) -> torch.Tensor:
    """Map intensities to 0..255.

    8-bit photographs pass through; DICOM, NIfTI and 16-bit images are scaled by their 0.5 and 99.5
    percentiles, which ignores outlier pixels (a constant image becomes 0).
    """
    if kind == "pil" and image.min() >= 0 and image.max() <= 255:
        return image
    low, high = np.percentile(image.numpy(), (0.5, 99.5))
    return (image - low) / max(float(high - low), 1e-8) * 255


def read_image(path: Path, image_size: int, nifti_slice: int | None = None) -> np.ndarray:
    """Read one 2D image (or one slice of a 3D volume), resized to a square.

    Args:
        path: the file; its suffix picks the reader (see ``READER_BY_SUFFIX``).
        image_size: output height and width; the whole image is resized, not cropped.
        nifti_slice: index along the last axis of a 3D volume; ``None`` takes the middle slice.

    Returns:
        ``(image_size, image_size, C)`` uint8 array with ``C`` 1 (grey) or 3 (RGB; alpha dropped).
    """
    kind = READER_BY_SUFFIX.get(image_suffix(path))
    if kind is None:
        raise DataError(f"{path}: unsupported file type; use one of {sorted(READER_BY_SUFFIX)}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tensor = torch.as_tensor(_loader(kind)(str(path))).float()
    except Exception as error:  # MONAI wraps every reader failure differently
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DataError(
            f"{path}: cannot read this {kind} image ({reason}); replace or remove the file"
        ) from None
    if tensor.ndim == 4:  # (C, H, W, D) volume: take one slice
        depth = tensor.shape[-1]
        index = depth // 2 if nifti_slice is None else nifti_slice
        if not -depth <= index < depth:
            raise DataError(f"{path}: slice {index} is outside the volume's {depth} slices; set nifti_slice")
        tensor = tensor[..., index]
    if tensor.ndim != 3:
        raise DataError(f"{path}: image has shape {tuple(tensor.shape)}; expected a 2D image or 3D volume")
    if tensor.shape[0] == 4:
        tensor = tensor[:3]
    if tensor.shape[0] not in (1, 3):
        raise DataError(f"{path}: image has {tensor.shape[0]} channels; expected 1 (grey) or 3 (RGB)")
    tensor = _scale_to_byte_range(tensor, kind)
    if tuple(tensor.shape[1:]) != (image_size, image_size):
        tensor = torch.nn.functional.interpolate(
            tensor[None], size=(image_size, image_size), mode="bilinear", antialias=True
        )[0]
    return tensor.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
