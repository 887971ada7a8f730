"""How the label and similarity checks see an image: a trained backbone's pooled features, or, without
one, a cheap fixed representation (downsampled pixels and colour histograms)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from fewshot_med.data.transforms import resize_images
from fewshot_med.models import BackboneSpec, embed

if TYPE_CHECKING:
    from torch import nn


#: Side of the downsampled pixels and bins per channel of the colour histograms (``cheap_features``).
CHEAP_SIDE = 8
HISTOGRAM_BINS = 16
CHEAP_DESCRIPTION = (
    f"cheap fixed representation: {CHEAP_SIDE}x{CHEAP_SIDE} downsampled pixels + {HISTOGRAM_BINS}-bin "
    "histograms per channel (no backbone given; pass --from RUN_ID for backbone features)"
)


def cheap_features(images: np.ndarray) -> np.ndarray:
    """A representation that needs no training: pixels at ``CHEAP_SIDE`` px and per-channel histograms.

    Args:
        images: ``(N, H, W, C)`` uint8.

    Returns:
        ``(N, CHEAP_SIDE**2 * C + HISTOGRAM_BINS * C)`` float32, pixels in [0, 1], histograms as fractions.
    """
    n_images, channels = images.shape[0], images.shape[-1]
    pixels = resize_images(images, CHEAP_SIDE).reshape(n_images, -1).astype(np.float32) / 255
    bins = (images.reshape(n_images, -1, channels).astype(np.int64) * HISTOGRAM_BINS) // 256
    histograms = [
        np.stack([np.bincount(row, minlength=HISTOGRAM_BINS) for row in bins[..., channel]])
        for channel in range(channels)
    ]
    pixel_count = images.shape[1] * images.shape[2]
    histogram = np.concatenate(histograms, axis=1).astype(np.float32) / max(pixel_count, 1)
    return np.concatenate([pixels, histogram], axis=1)


def backbone_features(
    backbone: nn.Module, spec: BackboneSpec, images: np.ndarray, device: torch.device
) -> np.ndarray:
    """``(N, D)`` float32 pooled features (``fewshot_med.models.embed``) of ``(N, H, W, C)`` uint8 images,
    resized to the backbone's ``spec.image_size`` first when they differ."""
    if images.shape[1] != spec.image_size:
        images = resize_images(images, spec.image_size)
    with torch.inference_mode():
        return embed(backbone, images, spec, device).numpy()
