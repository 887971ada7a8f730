"""Suspected label errors, two ways, each ranked.

* Confident learning (Northcutt et al., JAIR 2021) through ``cleanlab.filter.find_label_issues``, fed
  with out-of-fold predicted probabilities of a logistic regression (scikit-learn, stratified K-fold) on
  the image features, so no image is scored by a model that saw its label.
* Deep k-NN (Bahri et al., "Deep k-NN for Noisy Labels", ICML 2020): an image whose label is not the
  most common among its ``k`` nearest neighbours in feature space (cosine) is suspect; ranked by the
  share of neighbours that disagree.

Both live in ``fewshot_med.robustness.label_issues``, shared with the poisoning defences, so the audit
and the poisoning benchmark flag images the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fewshot_med.audit.findings import WARNING, Finding
from fewshot_med.audit.inventory import Item
from fewshot_med.robustness.label_issues import (
    confident_learning_issues,
    knn_disagreement,
    out_of_fold_probabilities,
    standardise,
)


@dataclass(frozen=True)
class LabelSettings:
    """``folds`` of the out-of-fold predictions (fewer when a class has fewer images), ``neighbours`` of
    deep k-NN, ``seed`` of the folds."""

    folds: int = 5
    neighbours: int = 10
    seed: int = 0


def find_label_issues(
    items: Sequence[Item],
    features: np.ndarray,
    readable: np.ndarray,
    class_names: Sequence[str],
    settings: LabelSettings = LabelSettings(),
) -> tuple[list[Finding], list[str]]:
    """Flag images whose label looks wrong, by cleanlab and by deep k-NN, each ranked most suspect first.

    Args:
        items: the images.
        features: ``(N, D)`` representation (rows of unreadable items ignored).
        readable: ``(N,)`` bool.
        class_names: every class; those with fewer than 2 readable images are left out.
        settings: folds, neighbours, seed.

    Returns:
        The findings (``label_issue`` rows, then ``knn_disagreement`` rows) and notes on what was left out.
    """
    counts = {name: 0 for name in class_names}
    for item, keep in zip(items, readable, strict=True):
        counts[item.label] += int(keep)
    kept_classes = [name for name in class_names if counts[name] >= 2]
    left_out = [name for name in class_names if 0 < counts[name] < 2]
    notes = (
        [f"label checks leave out classes with fewer than 2 images: {', '.join(left_out)}"]
        if left_out
        else []
    )
    if len(kept_classes) < 2:
        return [], [*notes, "label checks skipped: they need at least 2 classes of at least 2 images"]
    code = {name: index for index, name in enumerate(kept_classes)}
    index = np.asarray([i for i, item in enumerate(items) if readable[i] and item.label in code])
    labels = np.asarray([code[items[i].label] for i in index])
    folds = min(settings.folds, min(counts[name] for name in kept_classes))
    x = standardise(features[index].astype(np.float64))
    probabilities = out_of_fold_probabilities(x, labels, folds, settings.seed)
    ranked = confident_learning_issues(labels, probabilities)
    accuracy = float((probabilities.argmax(axis=1) == labels).mean())
    majority = float(np.bincount(labels).max() / len(labels))
    notes.append(
        f"label model: {folds}-fold logistic regression, out-of-fold accuracy {accuracy:.2f} (always "
        f"guessing the largest class: {majority:.2f}); the lower it is, the more suspects are the model's "
        "own mistakes rather than label errors"
    )
    findings = []
    for rank, row in enumerate(ranked, start=1):
        item, suggested = items[index[row]], int(probabilities[row].argmax())
        detail = (
            f"rank {rank} of {len(ranked)}: given {item.label} (p={probabilities[row, labels[row]]:.2f}), "
            f"model suggests {kept_classes[suggested]} (p={probabilities[row, suggested]:.2f}); "
            f"{folds}-fold logistic regression"
        )
        findings.append(Finding(item.name, "label_issue", WARNING, detail))
    plurality, disagreement, neighbours = knn_disagreement(x, labels, settings.neighbours)
    suspects = np.flatnonzero(plurality != labels)
    other_votes = (labels[neighbours] == plurality[:, None]).sum(axis=1)
    # most suspect first: fewest neighbours sharing the given label, then most agreeing on another one
    suspects = suspects[np.lexsort((-other_votes[suspects], -disagreement[suspects]))]
    k = neighbours.shape[1]
    for rank, row in enumerate(suspects, start=1):
        item, other, agreeing = items[index[row]], int(plurality[row]), int(other_votes[row])
        nearest = next(j for j in neighbours[row] if labels[j] == other)
        detail = (
            f"rank {rank} of {len(suspects)}: {agreeing} of {k} nearest neighbours are "
            f"{kept_classes[other]}, {round((1 - disagreement[row]) * k)} are {item.label} (given)"
        )
        findings.append(Finding(item.name, "knn_disagreement", WARNING, detail, items[index[nearest]].name))
    return findings, notes
