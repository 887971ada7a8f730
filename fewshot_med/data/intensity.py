"""Intensity handling: how the pixel values of a file become the 0..255 the backbone reads.

Photographs are 8-bit already; DICOM, NIfTI and 16-bit images are not, and radiology reads them in
fixed windows (Hounsfield units for CT), so a per-image stretch loses what separates classes. The
settings (``IntensityConfig``, the ``data.intensity`` config section) travel with a registered model
so predictions read files the same way as training did.
"""

from __future__ import annotations

from typing import Literal

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
