"""Out-of-distribution images: the Mahalanobis score of a backbone's features (Lee et al., "A Simple Unified
Framework for Detecting Out-of-Distribution Samples and Adversarial Attacks", NeurIPS 2018).

Class-conditional Gaussians with one shared covariance are fitted on reference features (the class
means, and ``sklearn.covariance.LedoitWolf`` on the features minus their class mean, shrunk because
features often outnumber the images of a class); an image's score is its smallest squared Mahalanobis
distance to a class mean. An image is flagged when its score exceeds a high quantile of the reference
images' own scores.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fewshot_med.audit.findings import WARNING, Finding
from fewshot_med.audit.inventory import Item
from fewshot_med.errors import DataError


@dataclass(frozen=True)
class GaussianReference:
    """Class-conditional Gaussians with a shared covariance, fitted on reference features.

    Attributes:
        means: ``(C, D)`` class means.
        precision: ``(D, D)`` inverse of the shared (Ledoit-Wolf) covariance.
        threshold: the ``quantile`` of the reference images' own scores.
        quantile: which quantile.
        description: what the reference is, for the report.
    """

    means: np.ndarray
    precision: np.ndarray
    threshold: float
    quantile: float
    description: str

    def scores(self, features: np.ndarray) -> np.ndarray:
        """``(N,)`` smallest squared Mahalanobis distance of ``(N, D)`` features to a class mean."""
        distances = np.stack(
            [((features - mean) @ self.precision * (features - mean)).sum(axis=1) for mean in self.means],
            axis=1,
        )
        return distances.min(axis=1)


def fit_reference(
    features: np.ndarray, labels: np.ndarray, quantile: float, description: str
) -> GaussianReference:
    """Fit the class Gaussians on ``(N, D)`` reference features with ``(N,)`` labels (Lee et al., 2018).

    Classes with fewer than 2 images are left out; the threshold is ``quantile`` of the reference's own
    (in-sample) scores.

    Raises:
        DataError: no class has 2 images.
    """
    from sklearn.covariance import LedoitWolf

    classes = [c for c in np.unique(labels) if (labels == c).sum() >= 2]
    if not classes:
        raise DataError(f"{description} has no class with 2 or more images to fit a Gaussian to")
    means = np.stack([features[labels == c].mean(axis=0) for c in classes])
    kept = np.isin(labels, classes)
    centred = features[kept] - means[np.searchsorted(classes, labels[kept])]
    precision = LedoitWolf(assume_centered=True).fit(centred).precision_
    reference = GaussianReference(means, precision, 0.0, quantile, description)
    own = reference.scores(features[kept])
    return GaussianReference(means, precision, float(np.quantile(own, quantile)), quantile, description)


def find_out_of_distribution(
    items: Sequence[Item], features: np.ndarray, readable: np.ndarray, reference: GaussianReference
) -> list[Finding]:
    """Flag readable images whose Mahalanobis score exceeds the reference's threshold, highest first.

    Args:
        items: the images.
        features: ``(N, D)`` backbone features (rows of unreadable items ignored).
        readable: ``(N,)`` bool.
        reference: the fitted class Gaussians.
    """
    index = np.flatnonzero(readable)
    scores = reference.scores(features[index].astype(np.float64))
    above = scores > reference.threshold
    order = np.argsort(-scores[above], kind="stable")
    findings = []
    for rank, (row, score) in enumerate(zip(index[above][order], scores[above][order], strict=True), start=1):
        detail = (
            f"rank {rank} of {int(above.sum())}: Mahalanobis score {score:.1f} > {reference.threshold:.1f} "
            f"(the {reference.quantile:.1%} quantile of {reference.description})"
        )
        findings.append(Finding(items[row].name, "out_of_distribution", WARNING, detail))
    return findings
