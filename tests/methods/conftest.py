"""Shared fixtures of the fine-tuning tests: a tiny image episode."""

import pytest
import torch
from torch import Tensor

#: side of the tiny images of the fine-tuning tests (the tests' backbones are built for it)
IMAGE_SIZE = 16


@pytest.fixture(scope="module")
def support() -> tuple[Tensor, Tensor, Tensor]:
    """``(support, labels, query)``: 3-way 2-shot coloured images, 6 queries."""
    generator = torch.Generator().manual_seed(0)
    colours = 1.5 * torch.randn(3, 3, 1, 1, generator=generator)
    labels = torch.arange(3).repeat_interleave(2)
    images = colours[labels.repeat(2)] + 0.3 * torch.randn(12, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    return images[:6], labels, images[6:]
