"""Classes too small for K-shot episodes: an episode needs K support images and at least one query."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fewshot_med.audit.findings import WARNING, Finding
from fewshot_med.audit.inventory import Item
from fewshot_med.data import SPLITS

#: Split name used when the data gives no splits (the toolkit assigns them later).
ALL = "all"


def find_small_classes(
    items: Sequence[Item], readable: np.ndarray, class_names: Sequence[str], shots: Sequence[int]
) -> list[Finding]:
    """One finding per class and split holding fewer than ``K + 1`` readable images for some ``K``.

    Args:
        items: the images.
        readable: ``(N,)`` bool; unreadable images do not count.
        class_names: every class (a class with no readable image in a split counts 0 there).
        shots: the Ks to check.

    Returns:
        Findings whose ``item`` is the class name, split by split (``train``, ``val``, ``test``: an empty
        split counts 0; ``all`` when the data give no splits).
    """
    splits = SPLITS if any(item.split is not None for item in items) else (ALL,)
    counts = {(split, name): 0 for split in splits for name in class_names}
    for item, keep in zip(items, readable, strict=True):
        counts[(item.split or ALL, item.label)] += int(keep)
    findings = []
    for (split, name), count in counts.items():
        failing = [k for k in sorted(shots) if count < k + 1]
        if failing:
            ks = ", ".join(map(str, failing))
            detail = f"{split}: {count} readable image(s); K = {ks} needs K + 1 (K support, 1 query)"
            findings.append(Finding(name, "small_class", WARNING, detail))
    return findings
