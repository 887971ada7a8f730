"""Test-time views: dihedral feature averaging, by hand, through ``embed``, the attacked feature model
and a pipeline context."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from fewshot_med.config import load_config
from fewshot_med.data import select_classes
from fewshot_med.data.demo import DEMO_NOVEL_CLASSES, make_demo_dataset
from fewshot_med.models import BackboneSpec, create_backbone, embed
from fewshot_med.models.views import VIEWS, view_features
from fewshot_med.pipelines.stages import open_context
from fewshot_med.robustness.adapted import FeatureModel, unit_images

CPU = torch.device("cpu")
SIZE = 16
SPEC = BackboneSpec("resnet10t", 3, SIZE, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.1))
DIHEDRAL = dataclasses.replace(SPEC, views="dihedral")
QUICKSTART = Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"


@pytest.fixture(scope="module")
def backbone() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_backbone(SPEC.name, SPEC.in_chans, SIZE).eval()


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    """``(6, 16, 16, 3)`` uint8 demo images."""
    dataset = make_demo_dataset(image_size=SIZE, images_per_common_class=40, images_per_rare_class=40)
    return select_classes(dataset, "test", DEMO_NOVEL_CLASSES).images[:6]


def _symmetries(images: np.ndarray) -> list[np.ndarray]:
    """The 8 rotations and mirrored rotations of ``(N, H, W, C)`` images, by numpy."""
    turned = [np.rot90(images, r, axes=(1, 2)) for r in range(4)]
    return [np.ascontiguousarray(t) for t in turned + [t[:, :, ::-1] for t in turned]]


def test_the_dihedral_views_are_the_eight_symmetries_of_the_square():
    grid = np.arange(16, dtype=np.float32).reshape(4, 4)
    views = VIEWS["dihedral"](torch.from_numpy(grid).view(1, 1, 4, 4))
    got = {tuple(view.flatten().tolist()) for view in views}
    expected = {tuple(s.flatten().tolist()) for s in _symmetries(grid[None, :, :, None])}
    assert len(views) == 8 and got == expected and len(got) == 8


def test_identity_is_the_backbone_and_dihedral_is_the_mean_over_views(backbone):
    batch = torch.rand(5, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(view_features(backbone, batch, "identity"), backbone(batch))
        by_hand = [backbone(torch.rot90(batch, r, dims=(2, 3))) for r in range(4)]
        by_hand += [backbone(torch.rot90(batch, r, dims=(2, 3)).flip(3)) for r in range(4)]
        torch.testing.assert_close(
            view_features(backbone, batch, "dihedral"), torch.stack(by_hand).mean(dim=0)
        )


def test_dihedral_features_do_not_change_when_the_image_is_rotated_or_mirrored(backbone, images):
    reference = embed(backbone, images, DIHEDRAL, CPU)
    for turned in _symmetries(images)[1:]:
        torch.testing.assert_close(embed(backbone, turned, DIHEDRAL, CPU), reference, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(embed(backbone, images, SPEC, CPU), reference, atol=1e-3)  # views do matter


def test_embed_with_views_is_the_mean_of_the_plain_embeddings_of_the_views(backbone, images):
    by_hand = torch.stack([embed(backbone, turned, SPEC, CPU) for turned in _symmetries(images)])
    torch.testing.assert_close(embed(backbone, images, DIHEDRAL, CPU), by_hand.mean(dim=0))


def test_the_attacked_feature_model_reads_the_same_views_as_embed(backbone, images):
    with torch.no_grad():
        attacked = FeatureModel(backbone, DIHEDRAL)(unit_images(images))
    torch.testing.assert_close(attacked, embed(backbone, images, DIHEDRAL, CPU), atol=1e-5, rtol=1e-5)


def test_the_config_sets_the_views_of_every_backbone_a_run_uses(backbone, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config(QUICKSTART, ["evaluation.test_time_views=dihedral"])
    context = open_context(config).with_backbone(backbone, SPEC)
    assert context.trained()[1].views == "dihedral"
    assert context.method_context(None).spec.views == "dihedral"
    older = {key: value for key, value in SPEC.to_dict().items() if key != "views"}  # logged before views
    assert BackboneSpec.from_dict(older).views == "identity"
