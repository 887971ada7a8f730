"""Data poisoning of few-shot adaptation, and the deep k-NN defence.

* ``flip_labels``: random label noise at a stated rate (the attacker, or a careless annotator, changes
  ``round(rate · N)`` labels, each to a different class).
* ``feature_collision_poison``: the clean-label "Poison Frogs!" attack (Shafahi, Huang, Najibi, Suciu,
  Studer, Dumitras & Goldstein, NeurIPS 2018). A poison ``x`` looks like a correctly labelled base image
  ``b`` but sits next to a target image ``t`` in feature space, found by forward-backward splitting on
  ``‖f(x) - f(t)‖² + β‖x - b‖²``: a gradient step on the feature term, then the proximal step of the
  image term, ``x ← (x + λβ b) / (1 + λβ)``, then clipping to ``[0, 1]``. (ART's
  ``FeatureCollisionAttack`` implements the same attack one image at a time through numpy and a named
  layer; here the backbone's output is the feature and a batch of poisons is crafted at once.)
* ``deep_knn_flags``: the deep k-NN defence (Peri, Gupta, Huang, Fowl, Zhu, Feizi, Goldstein &
  Dickerson, "Deep k-NN Defense against Clean-label Data Poisoning Attacks", ECCV Workshops 2020): flag
  a training image whose label is not the plurality label of its ``k`` nearest neighbours in feature
  space. It is the audit's deep k-NN (``fewshot_med.audit.labels.knn_disagreement``, after Bahri, Jiang &
  Gupta, ICML 2020), so ``fewshot-med audit`` and the poisoning benchmark flag the same images.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from fewshot_med.robustness.label_issues import knn_disagreement


def flip_labels(
    labels: np.ndarray, rate: float, n_classes: int, generator: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Change exactly ``round(rate · N)`` labels, chosen without replacement, each to one of the other
    ``n_classes - 1`` classes uniformly.

    Args:
        labels: ``(N,)`` integers in ``0 … n_classes - 1``.
        rate: share of labels to flip, in ``[0, 1]``.
        n_classes: number of classes (at least 2).
        generator: the randomness (``np.random.default_rng(seed)``).

    Returns:
        ``(N,)`` flipped labels (a new array) and the ``(N,)`` bool mask of the flipped positions.
    """
    if not 0.0 <= rate <= 1.0 or n_classes < 2:
        raise ValueError(
            f"flip_labels needs a rate in [0, 1] and at least 2 classes, got {rate}, {n_classes}"
        )
    labels = np.asarray(labels)
    chosen = generator.choice(len(labels), size=round(rate * len(labels)), replace=False)
    flipped = labels.copy()
    flipped[chosen] = (labels[chosen] + generator.integers(1, n_classes, size=len(chosen))) % n_classes
    mask = np.zeros(len(labels), dtype=bool)
    mask[chosen] = True
    return flipped, mask


def feature_collision_poison(
    backbone: Callable[[Tensor], Tensor],
    base_image: Tensor,
    target_image: Tensor,
    beta: float,
    steps: int,
    lr: float,
) -> Tensor:
    """Craft a clean-label poison by feature collision (Shafahi et al., 2018, Algorithm 1).

    Starting from the base image, each step takes ``x ← x - lr · ∇ₓ‖f(x) - f(t)‖²`` (forward), then
    ``x ← (x + lr·β·b) / (1 + lr·β)`` (backward: the proximal map of ``β‖x - b‖²``) and clips to
    ``[0, 1]``. Poisons of a batch are independent as long as ``backbone`` treats rows independently
    (eval mode); the backbone's weights are not changed.

    Args:
        backbone: ``(B, C, H, W)`` images in ``[0, 1]`` -> ``(B, D)`` features (normalising inside).
        base_image: ``(C, H, W)`` or ``(B, C, H, W)`` in ``[0, 1]``: what the poison should look like.
        target_image: same shape: whose features the poison should take.
        beta: weight of the image-space term (Shafahi et al. scale it by ``(D / (C·H·W))²``).
        steps: forward-backward iterations.
        lr: gradient step size ``λ``.

    Returns:
        The poison, shaped like ``base_image``, in ``[0, 1]``, detached.
    """
    single = base_image.dim() == 3
    base = (base_image.unsqueeze(0) if single else base_image).detach().float()
    target = (target_image.unsqueeze(0) if single else target_image).detach().float()
    with torch.no_grad():
        target_features = backbone(target)
    poison = base.clone()
    for _ in range(steps):
        poison.requires_grad_(True)
        loss = (backbone(poison) - target_features).pow(2).sum()
        (gradient,) = torch.autograd.grad(loss, poison)
        with torch.no_grad():
            poison = (poison - lr * gradient + lr * beta * base) / (1 + lr * beta)
            poison = poison.clamp(0.0, 1.0)
    poison = poison.detach()
    return poison[0] if single else poison


def peri_neighbours(labels: np.ndarray) -> int:
    """The default ``k`` of deep k-NN: the median number of images per class.

    Peri et al. (2020) vary ``k`` relative to the class size and find the defence works best with ``k``
    about the number of images per class (their "normalized k" near 1): fewer neighbours let a poison's
    few same-label companions outvote the target class it sits in; many more let other classes in.
    """
    return max(1, int(np.median(np.bincount(np.asarray(labels)))))


def deep_knn_flags(
    features: np.ndarray, labels: np.ndarray, k: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Deep k-NN defence (Peri et al., 2020): flag each image whose label is not the plurality label of
    its ``k`` nearest neighbours (cosine, the image itself excluded; ties keep the given label).

    Args:
        features: ``(N, D)`` backbone features.
        labels: ``(N,)`` in ``0 … C - 1``.
        k: neighbours; ``peri_neighbours(labels)`` when ``None``.

    Returns:
        ``(N,)`` bool flags and the ``(N,)`` share of neighbours whose label differs (to rank flags).
    """
    labels = np.asarray(labels)
    plurality, disagreement, _ = knn_disagreement(
        features, labels, peri_neighbours(labels) if k is None else k
    )
    return plurality != labels, disagreement
