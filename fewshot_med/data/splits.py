"""Patient-grouped, class-stratified train/val/test assignment."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from fewshot_med.data.dataset import SPLITS
from fewshot_med.errors import DataError

N_FOLDS = 20


def assign_splits(
    labels: np.ndarray,
    groups: np.ndarray | None = None,
    fractions: Sequence[float] = (0.7, 0.1, 0.2),
    seed: int = 0,
) -> np.ndarray:
    """Assign every image to ``train``, ``val`` or ``test``, never splitting a patient.

    Images are cut into (up to) 20 class-stratified folds of whole groups with scikit-learn's
    ``StratifiedGroupKFold``; each split takes a number of folds proportional to its fraction.

    Args:
        labels: ``(N,)`` class index per image.
        groups: ``(N,)`` patient identifier per image; ``None`` treats every image as its own patient.
        fractions: train, val and test fractions; they must sum to 1.
        seed: shuffles the groups before folding.

    Returns:
        ``(N,)`` array of split names.
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise DataError(f"split fractions {list(fractions)} must be three non-negative numbers summing to 1")
    n_images = len(labels)
    whole = [split for split, fraction in zip(SPLITS, fractions, strict=True) if fraction == 1]
    if whole:  # one split takes everything (e.g. adapt's cross-validation): nothing to cut
        return np.full(n_images, whole[0], dtype=object).astype(str)
    groups = np.arange(n_images) if groups is None else np.asarray(groups)
    n_folds = min(N_FOLDS, len(np.unique(groups)), int(np.bincount(labels).max()))
    if n_folds < 3:
        raise DataError(f"only {n_folds} patient group(s); at least 3 are needed for train/val/test")
    folds_per_split = np.round(np.asarray(fractions) * n_folds).astype(int)
    folds_per_split[0] = n_folds - folds_per_split[1:].sum()
    split_of_fold = np.repeat(np.asarray(SPLITS), folds_per_split)
    assignment = np.empty(n_images, dtype=object)
    folder = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        for fold, (_, fold_index) in enumerate(folder.split(np.zeros(n_images), labels, groups)):
            assignment[fold_index] = split_of_fold[fold]
    return assignment.astype(str)
