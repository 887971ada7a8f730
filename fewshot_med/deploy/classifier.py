"""A deployable few-shot classifier: backbone, a method adapted to labelled cases, a temperature, and the
preprocessing that turns files into the images it was fitted on."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from fewshot_med.data.transforms import to_model_input
from fewshot_med.deploy.preprocess import InputItem, Preprocessing, load_inputs
from fewshot_med.errors import DataError
from fewshot_med.methods.base import FewShotMethod
from fewshot_med.models.backbone import BackboneSpec
from fewshot_med.models.features import embed

if TYPE_CHECKING:
    import pandas as pd

#: Columns of ``predict_table`` after the per-class probabilities.
TABLE_COLUMNS = ("prediction", "confidence", "abstain", "error")


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
        preprocessing: how files, bytes and arrays of any size become its input images; ``None``:
            inputs must already be ``(N, S, S, C)`` uint8 like the training data.
        abstain_below: ``predict_table`` abstains when the top calibrated probability is below this
            (selective classification); ``None`` never abstains on a readable input.
    """

    backbone: nn.Module
    spec: BackboneSpec
    method: FewShotMethod
    temperature: float
    class_names: tuple[str, ...]
    preprocessing: Preprocessing | None = None
    abstain_below: float | None = None

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

    def predict_table(
        self, items: Sequence[InputItem] | np.ndarray, device: torch.device | None = None
    ) -> pd.DataFrame:
        """Classify N inputs, one row each, in order; one unreadable input never fails the others.

        Args:
            items: file paths, encoded file bytes or image arrays (read through ``preprocessing``), or
                an ``(N, H, W[, C])`` array of N images. Without ``preprocessing``: an ``(N, S, S, C)``
                uint8 array of the training size only.
            device: where the backbone runs; CPU when ``None``.

        Returns:
            One probability column per class, then ``prediction`` (the most probable class),
            ``confidence`` (its probability), ``abstain`` (confidence below ``abstain_below``) and
            ``error`` (``""``, or why the input could not be read). An unreadable input has NaN
            probabilities and confidence, an empty prediction and ``abstain`` true.
        """
        import pandas as pd

        images, errors = self._images(items)
        readable = np.asarray([error is None for error in errors], dtype=bool)
        probs = np.full((len(errors), len(self.class_names)), np.nan)
        if readable.any():
            probs[readable] = self.predict_proba(images, device)
        confidence = np.full(len(errors), np.nan)
        prediction = np.full(len(errors), "", dtype=object)
        if readable.any():
            confidence[readable] = probs[readable].max(axis=1)
            prediction[readable] = np.asarray(self.class_names, dtype=object)[probs[readable].argmax(axis=1)]
        abstain = ~readable
        if self.abstain_below is not None:
            abstain |= readable & (np.nan_to_num(confidence, nan=0.0) < self.abstain_below)
        table = pd.DataFrame(probs, columns=list(self.class_names))
        table["prediction"] = prediction
        table["confidence"] = confidence
        table["abstain"] = abstain
        table["error"] = [error or "" for error in errors]
        return table

    def _images(self, items: Sequence[InputItem] | np.ndarray) -> tuple[np.ndarray, list[str | None]]:
        """The ``(M, S, S, C)`` uint8 images of the readable items, and per item ``None`` or an error."""
        if self.preprocessing is not None:
            if isinstance(items, np.ndarray) and items.dtype != object:
                items = list(items)  # N images of any size
            return load_inputs(items, self.preprocessing)
        if not isinstance(items, np.ndarray) or items.dtype != np.uint8:
            raise DataError(
                "this classifier was saved without preprocessing: give an (N, H, W, C) uint8 array of "
                f"{self.spec.image_size} px images, or refit it with a Preprocessing to classify files"
            )
        return items, [None] * len(items)


def fit_classifier(
    backbone: nn.Module,
    spec: BackboneSpec,
    method: FewShotMethod,
    images: np.ndarray,
    labels: np.ndarray,
    class_names: tuple[str, ...],
    temperature: float,
    device: torch.device,
    preprocessing: Preprocessing | None = None,
    abstain_below: float | None = None,
) -> FewShotClassifier:
    """Adapt ``method`` to labelled ``(N, H, W, C)`` uint8 images with ``(N,)`` labels in
    ``0 … len(class_names)-1``, and wrap it with the backbone, the temperature, the preprocessing that
    turns files into such images (``None``: the classifier takes uint8 arrays only) and the abstention
    threshold (``None``: never abstain)."""
    images = np.asarray(images)
    channels = images.shape[-1] if images.ndim == 4 else 1
    if preprocessing is not None and (preprocessing.image_size, preprocessing.channels) != (
        spec.image_size,
        channels,
    ):
        raise ValueError(
            f"preprocessing gives {preprocessing.image_size} px images with {preprocessing.channels} "
            f"channel(s), but the classifier is fitted on {spec.image_size} px images with {channels}"
        )
    if abstain_below is not None and not 0.0 <= abstain_below <= 1.0:
        raise ValueError(f"abstain_below must be a probability in [0, 1], got {abstain_below}")
    labels_t = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    if method.inputs == "features":
        method.fit(embed(backbone, images, spec, device), labels_t)
    else:
        support = to_model_input(images, spec.mean, spec.std, spec.in_chans, device)
        method.fit(support, labels_t.to(device))
    return FewShotClassifier(
        backbone.eval(), spec, method, float(temperature), tuple(class_names), preprocessing, abstain_below
    )
