"""The feature-extractor view: embed images once, reuse the embeddings for every episode."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fewshot_med.data.transforms import to_model_input
from fewshot_med.models.backbone import BackboneSpec


def autocast(device: torch.device) -> torch.autocast:
    """bfloat16 autocast on CUDA (mixed precision); a disabled context elsewhere."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.inference_mode()
def embed(
    backbone: nn.Module,
    images: np.ndarray,
    spec: BackboneSpec,
    device: torch.device,
    batch_size: int = 512,
) -> torch.Tensor:
    """Compute pooled features for uint8 images, in eval mode, batch by batch.

    Args:
        backbone: maps ``(B, C, H, W)`` to ``(B, D)``.
        images: ``(N, H, W, C)`` uint8.
        spec: input normalisation and channels.
        device: where the forward passes run.
        batch_size: images per forward pass.

    Returns:
        ``(N, D)`` float32 features on the CPU.
    """
    was_training = backbone.training
    # one layout per device, whatever training left behind: a backbone fresh from pretraining (CPU
    # channels_last) and the same weights loaded from MLflow must give bitwise-equal features. Training's
    # layout is put back afterwards (contiguous weights slow channels_last training on the CPU by ~20%).
    # Outside inference mode, or the parameters would become inference tensors that training refuses.
    trained_layout = _memory_format(backbone)
    with torch.inference_mode(False):
        backbone.eval().to(device)
        backbone.to(memory_format=torch.channels_last if device.type == "cuda" else torch.contiguous_format)
    chunks = []
    for start in range(0, len(images), batch_size):
        batch = to_model_input(images[start : start + batch_size], spec.mean, spec.std, spec.in_chans, device)
        with autocast(device):
            chunks.append(backbone(batch).float().cpu())
    backbone.train(was_training)
    with torch.inference_mode(False):
        backbone.to(memory_format=trained_layout)
    if not chunks:
        return torch.zeros(0, backbone.num_features)
    return torch.cat(chunks)


def _memory_format(module: nn.Module) -> torch.memory_format:
    """channels_last when the module's 4-D weights are stored that way, else contiguous."""
    weight = next((p for p in module.parameters() if p.dim() == 4), None)
    channels_last = weight is not None and not weight.is_contiguous()
    if channels_last and weight.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format
