import numpy as np
import pytest
import torch

from fewshot_med.errors import FewshotMedError
from fewshot_med.models import (
    BackboneSpec,
    backbone_from_state,
    backbone_state,
    create_backbone,
    embed,
    load_checkpoint,
    save_checkpoint,
)


@pytest.mark.parametrize("name", ["resnet10t", "efficientnet_b0", "convnext_atto", "vit_tiny_patch16_224"])
@pytest.mark.parametrize("size", [28, 64])
def test_small_inputs_give_pooled_features(name, size):
    model = create_backbone(name, in_chans=3, image_size=size).eval()
    with torch.no_grad():
        features = model(torch.zeros(2, 3, size, size))
    assert features.shape == (2, model.num_features)


def test_resnet_stem_keeps_resolution_at_small_sizes():
    small, large = create_backbone("resnet18", image_size=32), create_backbone("resnet18", image_size=64)
    assert isinstance(small.maxpool, torch.nn.Identity)
    assert not isinstance(large.maxpool, torch.nn.Identity)


def test_unknown_model_and_bad_weights(tmp_path):
    with pytest.raises(FewshotMedError, match="'resnet_nonsense' is not a timm model"):
        create_backbone("resnet_nonsense")
    with pytest.raises(FewshotMedError, match="no such weights file"):
        create_backbone("resnet10t", weights=tmp_path / "absent.pt")
    torch.save(create_backbone("resnet18", image_size=32).state_dict(), tmp_path / "r18.pt")
    with pytest.raises(FewshotMedError, match=r"r18\.pt: weights do not fit resnet10t"):
        create_backbone("resnet10t", image_size=32, weights=tmp_path / "r18.pt")


def test_local_weights_and_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = create_backbone("resnet10t", image_size=16)
    spec = BackboneSpec("resnet10t", 3, 16, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    save_checkpoint(tmp_path / "ckpt.pt", backbone_state(model, spec))
    rebuilt, rebuilt_spec = backbone_from_state(load_checkpoint(tmp_path / "ckpt.pt"))
    from_file = create_backbone("resnet10t", image_size=16, weights=tmp_path / "ckpt.pt")
    x = torch.randn(2, 3, 16, 16)
    model.eval(), rebuilt.eval(), from_file.eval()
    assert rebuilt_spec == spec
    assert torch.equal(model(x), rebuilt(x)) and torch.equal(model(x), from_file(x))


def test_embed_matches_manual_forward_and_batches():
    torch.manual_seed(0)
    model = create_backbone("resnet10t", image_size=16)
    spec = BackboneSpec("resnet10t", 3, 16, (0.5,), (0.25,))
    images = np.random.default_rng(0).integers(0, 256, (7, 16, 16, 1), dtype=np.uint8)
    features = embed(model, images, spec, torch.device("cpu"), batch_size=3)
    manual = (
        torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255).sub(0.5).div(0.25).expand(-1, 3, -1, -1)
    )
    with torch.no_grad():
        expected = model.eval()(manual.contiguous())
    assert features.shape == (7, 512)
    assert torch.allclose(features, expected, atol=1e-5)
    assert model.training is False  # embed leaves the mode as it found it (eval here)
