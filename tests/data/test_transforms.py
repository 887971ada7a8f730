import numpy as np
import torch

from fewshot_med.data.transforms import augment_batch, channel_stats, to_model_input


def test_normalisation_and_grey_to_rgb():
    images = np.zeros((2, 4, 4, 1), np.uint8)
    images[1] = 255
    mean, std = channel_stats(images)
    assert mean == (0.5,) and std == (0.5,)
    batch = to_model_input(images, mean, std, in_chans=3)
    assert batch.shape == (2, 3, 4, 4) and batch.dtype == torch.float32
    assert torch.all(batch[0] == -1) and torch.all(batch[1] == 1)


def test_rgb_to_grey_model():
    images = np.stack([np.full((3, 3, 3), (0, 51, 102), np.uint8)])
    batch = to_model_input(images, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), in_chans=1)
    assert batch.shape == (1, 1, 3, 3)
    assert torch.allclose(batch, torch.full_like(batch, 0.2))


def test_augment_without_randomness_is_identity():
    batch = torch.randn(4, 3, 16, 16)
    same = augment_batch(
        batch, scale=(1, 1), ratio=(1, 1), max_rotation_deg=0, flips=False, brightness=0, contrast=0
    )
    assert torch.allclose(same, batch, atol=1e-4)


def test_augment_is_per_image_and_seeded():
    batch = torch.randn(1, 3, 16, 16).expand(8, -1, -1, -1).contiguous()
    first = augment_batch(batch, torch.Generator().manual_seed(0))
    assert torch.equal(first, augment_batch(batch, torch.Generator().manual_seed(0)))
    assert not torch.equal(first, augment_batch(batch, torch.Generator().manual_seed(1)))
    assert len({tuple(img.flatten()[:10].tolist()) for img in first}) == 8  # each image differs


def test_flips_only_permute_pixels():
    batch = torch.arange(2 * 16.0).reshape(1, 1, 4, 8).expand(16, -1, -1, -1).contiguous()
    flipped = augment_batch(
        batch, torch.Generator().manual_seed(0), scale=(1, 1), ratio=(1, 1), max_rotation_deg=0,
        brightness=0, contrast=0,
    )  # fmt: skip
    for image in flipped:
        assert torch.allclose(image.flatten().sort().values, batch[0].flatten(), atol=1e-3)
