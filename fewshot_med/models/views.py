"""Test-time views: an image's features averaged over label-preserving transforms of it.

Test-time augmentation of frozen features (e.g. Krizhevsky, Sutskever & Hinton, NeurIPS 2012, who
averaged predictions over crops and flips). For images without a canonical orientation (dermoscopy,
blood smears, histology) the eight symmetries of the square, the dihedral group D4 (four 90-degree
rotations, each with and without a mirror flip), keep the label, and averaging the backbone's
features over them removes orientation noise the support set is too small to average out. Images
with an orientation (chest X-rays: the heart is on the left) must keep ``identity``.

``BackboneSpec.views`` names the entry of ``VIEWS`` every embedding of a run uses (``embed``, the
attacked ``FeatureModel``, the exported MONAI network), so a registered classifier reads new images
exactly as its head was fitted; the config sets it (``evaluation.test_time_views``).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn


def _identity(batch: Tensor) -> list[Tensor]:
    return [batch]


def _dihedral(batch: Tensor) -> list[Tensor]:
    rotations = [batch.rot90(turns, dims=(2, 3)) for turns in range(4)]
    return rotations + [rotation.flip(3) for rotation in rotations]


#: View sets by name: ``(B, C, H, W)`` model input -> the list of its views, each ``(B, C, H, W)``
#: (``H == W`` for the rotations).
VIEWS: dict[str, Callable[[Tensor], list[Tensor]]] = {"identity": _identity, "dihedral": _dihedral}


def view_features(backbone: nn.Module | Callable[[Tensor], Tensor], batch: Tensor, views: str) -> Tensor:
    """The mean of ``backbone``'s features over the ``views`` of ``batch``: ``(B, C, H, W)`` -> ``(B, D)``.

    One forward pass per view (not one of ``V·B`` images), so memory stays that of the plain batch;
    differentiable in ``batch``. ``identity`` is exactly ``backbone(batch)``.
    """
    outputs = [backbone(view) for view in VIEWS[views](batch)]
    if len(outputs) == 1:
        return outputs[0]
    return sum(outputs[1:], outputs[0]) / len(outputs)
