"""Image tensors for models: normalisation, channel handling, batched on-device augmentation."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from fewshot_med.data.device_io import to_device

#: Pixels per chunk of ``channel_stats`` (256 MB as float64); within one chunk it is numpy's mean and std.
STATS_CHUNK_PIXELS = 1 << 25


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of uint8 images, in ``[0, 1]`` units, chunk by chunk
    (merged as in Chan, Golub & LeVeque, "Algorithms for computing the sample variance", 1983), so a
    memory-mapped dataset is never copied whole.

    Args:
        images: ``(N, H, W, C)`` uint8.

    Returns:
        ``(mean, std)``, each a tuple of ``C`` floats.
    """
    step = max(1, STATS_CHUNK_PIXELS // max(1, int(np.prod(images.shape[1:-1]))))
    count, mean, var = 0, np.zeros(images.shape[-1]), np.zeros(images.shape[-1])
    for start in range(0, max(1, len(images)), step):
        pixels = images[start : start + step].reshape(-1, images.shape[-1]).astype(np.float64) / 255.0
        n, chunk_mean, chunk_var = len(pixels), pixels.mean(axis=0), pixels.var(axis=0)
        if count == 0:
            mean, var = chunk_mean, chunk_var
        else:
            delta, total = chunk_mean - mean, count + n
            mean = mean + delta * (n / total)
            var = (var * count + chunk_var * n + delta**2 * (count * n / total)) / total
        count += n
    return tuple(mean.tolist()), tuple(np.maximum(np.sqrt(var), 1e-3).tolist())


#: Images resized per chunk (bounds the float copy to a few hundred MB at 224 px).
RESIZE_CHUNK = 1024


def resize_images(images: np.ndarray, image_size: int) -> np.ndarray:
    """``(N, H, W, C)`` uint8 -> ``(N, image_size, image_size, C)`` uint8: the whole image resized,
    bilinear with antialiasing (``torch.nn.functional.interpolate``), rounded and clipped."""
    chunks = []
    for start in range(0, len(images), RESIZE_CHUNK):
        batch = torch.from_numpy(np.ascontiguousarray(images[start : start + RESIZE_CHUNK])).permute(
            0, 3, 1, 2
        )
        resized = F.interpolate(batch.float(), size=(image_size, image_size), mode="bilinear", antialias=True)
        chunks.append(resized.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy())
    if not chunks:
        return np.zeros((0, image_size, image_size, images.shape[-1]), dtype=np.uint8)
    return np.concatenate(chunks)


def to_model_input(
    images: np.ndarray | torch.Tensor,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    in_chans: int = 3,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Turn uint8 images into a normalised float batch on ``device``.

    The uint8 data is moved first (pinned on its way to CUDA, ``to_device``) and converted there, so a
    host-to-GPU copy is 4x smaller.
    Grey images are repeated to ``in_chans`` channels; RGB images with ``in_chans == 1`` are averaged.
    On CUDA the result is channels_last, the faster layout for convolutions there.

    Args:
        images: ``(N, H, W, C)`` uint8, ``C`` 1 or 3.
        mean: per-channel mean of the source channels, in ``[0, 1]`` units (see ``channel_stats``).
        std: per-channel standard deviation, same units.
        in_chans: channels the model expects.
        device: where the batch goes.

    Returns:
        ``(N, in_chans, H, W)`` float32.
    """
    batch = to_device(torch.as_tensor(images), device).permute(0, 3, 1, 2).float().div_(255)
    mean_t = torch.tensor(mean, device=batch.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=batch.device).view(1, -1, 1, 1)
    batch = (batch - mean_t) / std_t
    if batch.shape[1] != in_chans:
        batch = batch.mean(dim=1, keepdim=True) if in_chans == 1 else batch.expand(-1, in_chans, -1, -1)
    memory_format = torch.channels_last if batch.device.type == "cuda" else torch.contiguous_format
    return batch.contiguous(memory_format=memory_format)


def augment_batch(
    batch: torch.Tensor,
    generator: torch.Generator | None = None,
    scale: tuple[float, float] = (0.5, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    max_rotation_deg: float = 180.0,
    flips: bool = True,
    brightness: float = 0.2,
    contrast: float = 0.2,
) -> torch.Tensor:
    """Augment every image of a batch with its own random parameters, in one ``grid_sample`` call.

    Per image: a random resized crop (area fraction in ``scale``, aspect in ``ratio``), a rotation,
    horizontal and vertical flips, and brightness/contrast jitter. Sampling stays on the batch's
    device, so the data path adds no host work. Rotations and flips suit images without a canonical
    orientation (dermoscopy, microscopy); set ``max_rotation_deg=0`` and ``flips=False`` otherwise.

    Args:
        batch: ``(N, C, H, W)`` float, already normalised.
        generator: source of randomness (on the batch's device) for reproducible augmentation.
        scale: range of the crop's area as a fraction of the image.
        ratio: range of the crop's aspect ratio (width / height).
        max_rotation_deg: rotations are uniform in ``±max_rotation_deg``.
        flips: random horizontal and vertical flips.
        brightness: additive shift, uniform in ``±brightness`` (in normalised units).
        contrast: multiplicative factor, uniform in ``1 ± contrast``.

    Returns:
        ``(N, C, H, W)`` augmented batch, same dtype, device and memory format.
    """
    n = batch.shape[0]

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, device=batch.device, generator=generator)

    area = uniform(*scale)
    aspect = torch.exp(uniform(math.log(ratio[0]), math.log(ratio[1])))
    width = torch.sqrt(area * aspect).clamp(max=1.0)
    height = torch.sqrt(area / aspect).clamp(max=1.0)
    shift_x = uniform(-1, 1) * (1 - width)
    shift_y = uniform(-1, 1) * (1 - height)
    angle = uniform(-max_rotation_deg, max_rotation_deg) * (math.pi / 180)
    if flips:
        width = width * (torch.randint(0, 2, (n,), device=batch.device, generator=generator) * 2 - 1)
        height = height * (torch.randint(0, 2, (n,), device=batch.device, generator=generator) * 2 - 1)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack(
        [
            torch.stack([width * cos, -height * sin, shift_x], dim=1),
            torch.stack([width * sin, height * cos, shift_y], dim=1),
        ],
        dim=1,
    ).to(batch.dtype)
    grid = F.affine_grid(theta, list(batch.shape), align_corners=False)
    out = F.grid_sample(batch, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    image_mean = out.mean(dim=(1, 2, 3), keepdim=True)
    factor = uniform(1 - contrast, 1 + contrast).view(n, 1, 1, 1).to(batch.dtype)
    shift = uniform(-brightness, brightness).view(n, 1, 1, 1).to(batch.dtype)
    out = (out - image_mean) * factor + image_mean + shift
    return out.contiguous(memory_format=_memory_format(batch))


def _memory_format(batch: torch.Tensor) -> torch.memory_format:
    """channels_last if ``batch`` is stored that way, else contiguous."""
    if batch.is_contiguous(memory_format=torch.channels_last) and not batch.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format
