"""A deployable few-shot classifier: backbone, a method adapted to labelled cases, and a temperature."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fewshot_med.data.transforms import to_model_input
from fewshot_med.methods.base import FewShotMethod
from fewshot_med.models.backbone import BackboneSpec
from fewshot_med.models.features import embed


@dataclass
class FewShotClassifier:
    """Classify new images among the classes of the support set the method was fitted on.

    Frozen-feature methods score the backbone's embeddings; image methods (fine-tuning) score the
    normalised images. The logits are divided by ``temperature`` (1 = uncalibrated), so the
    probabilities carry the calibration measured in the evaluation.

    Attributes:
        backbone: maps ``(N, C, H, W)`` to ``(N, D)``.
        spec: the backbone's input size, channels and normalisation.
        method: a fitted ``FewShotMethod`` (single support set, not a batch of episodes).
        temperature: divides the logits.
        class_names: the name of each logit column.
    """

    backbone: nn.Module
    spec: BackboneSpec
    method: FewShotMethod
    temperature: float
    class_names: tuple[str, ...]

    @torch.inference_mode()
    def predict_logits(self, images: np.ndarray, device: torch.device | None = None) -> np.ndarray:
        """``(N, H, W, C)`` (or ``(N, H, W)`` grey) uint8 images -> ``(N, n_classes)`` calibrated logits."""
        device = device or torch.device("cpu")
        images = np.asarray(images)
        if images.ndim == 3:
            images = images[..., None]
        size = self.spec.image_size
        if images.ndim != 4 or images.shape[1:3] != (size, size) or images.dtype != np.uint8:
            raise ValueError(
                f"images must be uint8 of shape (N, {size}, {size}, C) like the training data, "
                f"got {images.dtype} {images.shape}"
            )
        if self.method.inputs == "features":
            inputs = embed(self.backbone, images, self.spec, device)
        else:
            inputs = to_model_input(images, self.spec.mean, self.spec.std, self.spec.in_chans, device)
        return self.method.predict_logits(inputs).double().numpy() / self.temperature

    def predict_proba(self, images: np.ndarray, device: torch.device | None = None) -> np.ndarray:
        """``(N, n_classes)`` calibrated class probabilities."""
        logits = self.predict_logits(images, device)
        exp = np.exp(logits - logits.max(axis=1, keepdims=True))
        return exp / exp.sum(axis=1, keepdims=True)


def fit_classifier(
    backbone: nn.Module,
    spec: BackboneSpec,
    method: FewShotMethod,
    images: np.ndarray,
    labels: np.ndarray,
    class_names: tuple[str, ...],
    temperature: float,
    device: torch.device,
) -> FewShotClassifier:
    """Adapt ``method`` to labelled ``(N, H, W, C)`` uint8 images with ``(N,)`` labels in
    ``0 … len(class_names)-1``, and wrap it with the backbone and the temperature."""
    labels_t = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    if method.inputs == "features":
        method.fit(embed(backbone, images, spec, device), labels_t)
    else:
        support = to_model_input(images, spec.mean, spec.std, spec.in_chans, device)
        method.fit(support, labels_t.to(device))
    return FewShotClassifier(backbone.eval(), spec, method, float(temperature), tuple(class_names))
