"""The feature-extractor view: embed images once, reuse the embeddings for every episode; and the GPU
path every loop shares: bfloat16 autocast, the memory layout of inference, optional ``torch.compile``."""

from __future__ import annotations

import os
import shutil
import sys
from importlib.util import find_spec

import numpy as np
import torch
from torch import nn

from fewshot_med.data.transforms import to_model_input
from fewshot_med.errors import ConfigError
from fewshot_med.models.backbone import BackboneSpec
from fewshot_med.models.views import view_features

#: the mixed-precision dtype: bfloat16 keeps float32's exponent range, so no loss scaling is needed
AUTOCAST_DTYPE = torch.bfloat16


def uses_autocast(device: torch.device) -> bool:
    """Whether forward passes on ``device`` run in ``AUTOCAST_DTYPE`` autocast: on CUDA only (on the
    CPU bfloat16 convolutions are slower than float32 ones)."""
    return device.type == "cuda"


def autocast(device: torch.device) -> torch.autocast:
    """bfloat16 autocast where ``uses_autocast(device)`` (CUDA); a disabled context elsewhere.

    Outputs of autocast regions are ``AUTOCAST_DTYPE``: callers cast features and logits back to
    float32 (``.float()``) before losses and methods see them.
    """
    return torch.autocast(device_type=device.type, dtype=AUTOCAST_DTYPE, enabled=uses_autocast(device))


def inference_memory_format(device: torch.device) -> torch.memory_format:
    """The layout ``embed`` runs in: channels_last on CUDA (faster convolutions, and what a CUDA batch
    from ``to_model_input`` is); contiguous elsewhere, so features do not depend on the layout training
    left behind."""
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


def compile_blocker(device_type: str) -> str | None:
    """Why ``torch.compile`` (TorchInductor) cannot generate kernels for ``device_type`` here, else ``None``.

    Inductor compiles C++ for the CPU (``$CXX``, else ``g++``; ``clang++`` on macOS) and Triton kernels
    for CUDA, whose launcher Triton builds with a C compiler (``$CC``, else ``gcc`` or ``clang``).
    """
    if device_type == "cuda":
        if find_spec("triton") is None:
            return "TorchInductor's CUDA kernels need triton, which is not installed"
        compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")
        return None if compiler else "Triton needs a C compiler (gcc or clang, or $CC) and none was found"
    if device_type == "cpu":
        compiler = os.environ.get("CXX") or ("clang++" if sys.platform == "darwin" else "g++")
        found = shutil.which(compiler)
        return None if found else f"TorchInductor's CPU kernels need the C++ compiler {compiler!r}, not found"
    return None


def compiled(module: nn.Module, device: torch.device) -> nn.Module:
    """``torch.compile(module)``: a wrapper that shares ``module``'s parameters and buffers and runs its
    forward as generated kernels (compiled on the first call of each new input shape or mode).

    Train and checkpoint ``module`` itself: the wrapper's ``state_dict`` keys carry an ``_orig_mod.``
    prefix that a plain backbone does not load.

    Raises:
        ConfigError: no compiler for ``device`` (``compile_blocker``), before any work.
    """
    blocker = compile_blocker(device.type)
    if blocker is not None:
        raise ConfigError(f"runtime.compile: {blocker}; install it or set runtime.compile: false")
    return torch.compile(module)


@torch.inference_mode()
def embed(
    backbone: nn.Module,
    images: np.ndarray,
    spec: BackboneSpec,
    device: torch.device,
    batch_size: int = 512,
    compile: bool = False,
) -> torch.Tensor:
    """Compute pooled features for uint8 images, in eval mode, batch by batch, averaged over the
    test-time views ``spec.views`` (``fewshot_med.models.views``).

    Args:
        backbone: maps ``(B, C, H, W)`` to ``(B, D)``.
        images: ``(N, H, W, C)`` uint8.
        spec: input normalisation and channels.
        device: where the forward passes run.
        batch_size: images per forward pass.
        compile: run the forward passes through ``compiled(backbone, device)`` (``runtime.compile``).

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
        backbone.to(memory_format=inference_memory_format(device))
    forward = compiled(backbone, device) if compile else backbone
    chunks = []
    for start in range(0, len(images), batch_size):
        batch = to_model_input(images[start : start + batch_size], spec.mean, spec.std, spec.in_chans, device)
        with autocast(device):
            chunks.append(view_features(forward, batch, spec.views).float().cpu())
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
