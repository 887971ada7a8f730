"""Host-to-device copies of batches: through page-locked (pinned) memory when the device is CUDA.

A ``non_blocking`` copy from ordinary (pageable) host memory is staged by the driver and keeps the host
waiting; from pinned memory it is a DMA transfer that overlaps with the kernels already queued
(PyTorch, "CUDA semantics: use pinned memory buffers",
https://pytorch.org/docs/stable/notes/cuda.html#use-pinned-memory-buffers). Batches here are gathered
on the host by fancy indexing (a fresh array per step), so each one is pinned on its way out, as
``DataLoader(pin_memory=True)`` does for its batches.
"""

from __future__ import annotations

import torch


def pins_memory(batch: torch.Tensor, device: torch.device | str) -> bool:
    """Whether ``to_device`` pins ``batch`` first: a CPU tensor, not yet pinned, bound for CUDA."""
    return torch.device(device).type == "cuda" and batch.device.type == "cpu" and not batch.is_pinned()


def to_device(batch: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``batch`` on ``device`` by a non-blocking copy; pinned first when bound for CUDA (``pins_memory``).

    A tensor already on ``device`` is returned as is (the same object), so CPU behaviour is
    ``batch.to("cpu")``'s: no copy.
    """
    if pins_memory(batch, device):
        batch = batch.pin_memory()
    return batch.to(device, non_blocking=True)
