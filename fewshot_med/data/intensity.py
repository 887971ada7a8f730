"""Intensity handling: how the pixel values of a file become the 0..255 the backbone reads.

Photographs are 8-bit already; DICOM, NIfTI and 16-bit images are not, and radiology reads them in
fixed windows (Hounsfield units for CT), so a per-image stretch loses what separates classes. The
settings (``IntensityConfig``, the ``data.intensity`` config section) travel with a registered model
so predictions read files the same way as training did.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, model_validator


class IntensityConfig(BaseModel):
    """How the pixel values of a file become 0..255 (``fewshot_med.data.intensity``).

    ``auto``: 8-bit photographs pass through, everything else is scaled by its own ``percentiles``;
    ``percentiles``: every image by its own percentiles (photos included); ``window``: a fixed
    radiology window ``center`` ± ``width``/2 in the file's rescaled units (Hounsfield for CT), the same
    for every image; ``range``: the fixed raw range ``[low, high]`` (after DICOM rescale slope and
    intercept), so absolute intensity is kept.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["auto", "percentiles", "window", "range"] = "auto"
    percentiles: tuple[float, float] = Field((0.5, 99.5), description="lower, upper percentile (0-100)")
    center: float | None = Field(None, description="window centre (mode window), e.g. 40 for CT soft tissue")
    width: PositiveFloat | None = Field(None, description="window width (mode window), e.g. 400")
    range: tuple[float, float] | None = Field(None, description="[low, high] raw values (mode range)")

    @model_validator(mode="after")
    def _mode_has_its_values(self) -> IntensityConfig:
        low, high = self.percentiles
        if not 0 <= low < high <= 100:
            raise ValueError(f"percentiles {list(self.percentiles)} must satisfy 0 <= lower < upper <= 100")
        if self.mode == "window" and (self.center is None or self.width is None):
            raise ValueError("mode window needs center and width (e.g. center: 40, width: 400 for CT)")
        if self.mode == "range" and (self.range is None or self.range[0] >= self.range[1]):
            raise ValueError("mode range needs range: [low, high] with low < high")
        return self


def to_byte_range(image: torch.Tensor, intensity: IntensityConfig, photo: bool) -> torch.Tensor:
    """Map an image's pixel values to 0..255 as ``intensity.mode`` says.

    ``percentiles``, ``window`` and ``range`` are MONAI's ``ScaleIntensityRangePercentiles`` and
    ``ScaleIntensityRange`` with ``b_min=0, b_max=255, clip=True``. ``window`` and ``range`` read values in
    the file's rescaled units: MONAI's ``PydicomReader`` applies DICOM RescaleSlope/RescaleIntercept
    (Hounsfield units for CT) and nibabel applies NIfTI ``scl_slope``/``scl_inter``.

    Args:
        image: ``(C, H, W)`` float32 pixel values as read.
        intensity: the ``data.intensity`` settings.
        photo: the pixels are an 8-bit photograph (PNG/JPEG/BMP/TIFF, 8-bit DICOM, uint8 array); under
            ``auto`` such an image passes through unchanged when its values lie in 0..255.

    Returns:
        ``(C, H, W)`` float32 in 0..255. Under ``auto`` the percentile stretch is not clipped (values
        beyond the percentiles fall outside 0..255 and are clipped after resizing), as before modes
        existed.
    """
    return _MODES[intensity.mode](image, intensity, photo)


def _auto(image: torch.Tensor, intensity: IntensityConfig, photo: bool) -> torch.Tensor:
    """8-bit photographs as they are; anything else stretched by its own percentiles, unclipped.

    Written out rather than MONAI's ``ScaleIntensityRangePercentiles(clip=False)``: MONAI's float32
    arithmetic differs in the last bit and moves about 3 pixels per million by one grey level, which
    would change the content digest of local datasets read before intensity modes existed."""
    if photo and image.min() >= 0 and image.max() <= 255:
        return image
    low, high = np.percentile(image.numpy(), intensity.percentiles)
    return (image - low) / max(float(high - low), 1e-8) * 255


def _percentiles(image: torch.Tensor, intensity: IntensityConfig, photo: bool) -> torch.Tensor:
    """Each image stretched between its own lower and upper percentiles (photographs too), clipped."""
    from monai.transforms import ScaleIntensityRangePercentiles

    lower, upper = intensity.percentiles
    return _plain(ScaleIntensityRangePercentiles(lower, upper, b_min=0, b_max=255, clip=True), image)


def _window(image: torch.Tensor, intensity: IntensityConfig, photo: bool) -> torch.Tensor:
    """The fixed window ``center ± width / 2`` mapped to 0..255, clipped (the same for every image)."""
    from monai.transforms import ScaleIntensityRange

    low, high = intensity.center - intensity.width / 2, intensity.center + intensity.width / 2
    return _plain(ScaleIntensityRange(a_min=low, a_max=high, b_min=0, b_max=255, clip=True), image)


def _range(image: torch.Tensor, intensity: IntensityConfig, photo: bool) -> torch.Tensor:
    """The fixed range ``[low, high]`` mapped to 0..255, clipped (the same for every image)."""
    from monai.transforms import ScaleIntensityRange

    low, high = intensity.range
    return _plain(ScaleIntensityRange(a_min=low, a_max=high, b_min=0, b_max=255, clip=True), image)


def _plain(transform: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor) -> torch.Tensor:
    """Apply a MONAI transform; returns a plain float32 tensor (no MetaTensor). A zero-width range (a
    constant image under ``percentiles``), about which MONAI warns, gives 0."""
    from monai.utils import convert_to_tensor

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Divide by zero")
        return convert_to_tensor(transform(image), dtype=torch.float32, track_meta=False)


_MODES: dict[str, Callable[[torch.Tensor, IntensityConfig, bool], torch.Tensor]] = {
    "auto": _auto,
    "percentiles": _percentiles,
    "window": _window,
    "range": _range,
}
