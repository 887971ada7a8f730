"""Head-only fine-tuning embeds every step's support batch up front: the same head, far fewer passes."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from fewshot_med.methods import MethodContext, create_method
from fewshot_med.methods.finetune import FineTune
from fewshot_med.models import create_backbone
from tests.methods.conftest import IMAGE_SIZE


@pytest.fixture(scope="module")
def backbone() -> nn.Module:
    torch.manual_seed(0)
    return create_backbone("resnet10t", image_size=IMAGE_SIZE).eval()


class CountingBackbone(nn.Module):
    """The backbone, counting its forward passes."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.num_features, self.calls = inner, inner.num_features, 0

    def forward(self, images: Tensor) -> Tensor:
        self.calls += 1
        return self.inner(images)


@pytest.mark.parametrize("augment", [True, False])
def test_cached_support_features_train_the_same_head_as_a_pass_per_step(
    backbone, support, augment, monkeypatch
):
    images, labels, query = support
    context = MethodContext(backbone=backbone, seed=0)
    params = {"mode": "head", "steps": 12, "augment": augment}
    cached = create_method("finetune", context, **params).fit(images, labels)
    monkeypatch.setattr(FineTune, "_support_features", lambda self, *args: None)  # one pass per step
    per_step = create_method("finetune", context, **params).fit(images, labels)
    torch.testing.assert_close(cached.head_.weight, per_step.head_.weight, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        cached.predict_logits(query), per_step.predict_logits(query), rtol=1e-4, atol=1e-4
    )


def test_head_mode_embeds_the_support_in_few_passes(backbone, support):
    images, labels, _ = support
    counting = CountingBackbone(backbone)
    context = MethodContext(backbone=counting, seed=0)
    method = create_method("finetune", context, mode="head", steps=50, batch_size=120)
    method.fit(images, labels)
    # imprinting (1) + 50 augmented views of 6 images, 20 views (120 images) per pass (3)
    assert method.backbone_.calls == 4
