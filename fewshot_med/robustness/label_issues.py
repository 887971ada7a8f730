"""Suspected label errors from image features, two ways, shared by the audit (``fewshot_med.audit.labels``)
and the poisoning defences (``fewshot_med.robustness.poisoning``), so both flag images the same way.

* Confident learning (Northcutt et al., JAIR 2021) through ``cleanlab.filter.find_label_issues``, fed
  with out-of-sample predicted probabilities (``out_of_fold_probabilities``).
* Deep k-NN (Bahri et al., "Deep k-NN for Noisy Labels", ICML 2020; as a poisoning defence, Peri et al.,
  ECCV-W 2020): an image whose label is not the most common among its ``k`` nearest neighbours in
  feature space (cosine) is suspect.
"""

from __future__ import annotations

import numpy as np


def out_of_fold_probabilities(features: np.ndarray, labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """``(N, C)`` predicted probabilities, each from a standardised logistic regression fitted on the
    other folds (``sklearn.model_selection.cross_val_predict``, ``StratifiedKFold``).

    Args:
        features: ``(N, D)``.
        labels: ``(N,)`` in ``0..C-1``, every class with at least ``folds`` images.
        folds: number of folds.
        seed: shuffles the folds.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    folder = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return cross_val_predict(model, features, labels, cv=folder, method="predict_proba")


def confident_learning_issues(labels: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    """Confident learning's suspected label errors (``cleanlab.filter.find_label_issues``), most suspect
    first (ranked by self-confidence).

    Args:
        labels: ``(N,)`` given labels in ``0..C-1``.
        probabilities: ``(N, C)`` out-of-sample predicted probabilities.

    Returns:
        Row indices of the suspects.
    """
    from cleanlab.filter import find_label_issues as cleanlab_issues

    return cleanlab_issues(  # n_jobs=1: no process pool, whose workers inherit the CLI's signal handlers
        labels, probabilities, return_indices_ranked_by="self_confidence", n_jobs=1
    )


def knn_disagreement(
    features: np.ndarray, labels: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Deep k-NN's view of each image (Bahri et al., 2020).

    Args:
        features: ``(N, D)``; compared by cosine (rows L2-normalised).
        labels: ``(N,)`` in ``0..C-1``.
        k: neighbours (the image itself excluded).

    Returns:
        ``(N,)`` plurality label of the neighbours (ties go to the given label), ``(N,)`` share of
        neighbours whose label differs from the image's, ``(N, k)`` neighbour indices, nearest first.
    """
    from sklearn.neighbors import NearestNeighbors

    unit = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    k = min(k, len(unit) - 1)
    _, found = NearestNeighbors(n_neighbors=k + 1).fit(unit).kneighbors(unit)
    neighbours = np.stack([np.asarray([j for j in row if j != i][:k]) for i, row in enumerate(found)])
    n_classes = int(labels.max()) + 1
    votes = np.stack([np.bincount(labels[row], minlength=n_classes) for row in neighbours])
    own = votes[np.arange(len(labels)), labels]
    plurality = np.where(own == votes.max(axis=1), labels, votes.argmax(axis=1))
    return plurality, 1 - own / k, neighbours


def standardise(features: np.ndarray) -> np.ndarray:
    """Columns at mean 0, variance 1 (constant columns stay 0), so no dimension dominates a distance."""
    return (features - features.mean(axis=0)) / np.maximum(features.std(axis=0), 1e-8)
