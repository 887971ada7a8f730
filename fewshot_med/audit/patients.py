"""Patient leaks in the metadata: one patient id in two splits, so a model is tested on a patient it was
trained on (``fewshot_med.data.local`` refuses such a manifest; the audit lists every case)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from fewshot_med.audit.findings import ERROR, Finding
from fewshot_med.audit.inventory import Item
from fewshot_med.data import SPLITS


def find_patient_leaks(items: Sequence[Item]) -> list[Finding]:
    """Flag every image of a patient that lies outside the patient's main split (the split holding most of
    the patient's images; ties go to the earlier of train, val, test).

    Args:
        items: the images; those without a split or a patient id are skipped.

    Returns:
        One finding per such image, ``related_item`` an image of the same patient in the main split.
    """
    by_patient: dict[str, list[Item]] = {}
    for item in items:
        if item.patient is not None and item.split is not None:
            by_patient.setdefault(item.patient, []).append(item)
    findings = []
    for patient_items in by_patient.values():
        counts = Counter(item.split for item in patient_items)
        if len(counts) < 2:
            continue
        main = min(counts, key=lambda split: (-counts[split], SPLITS.index(split)))
        anchor = next(item for item in patient_items if item.split == main)
        spread = ", ".join(f"{counts[split]} in {split}" for split in SPLITS if split in counts)
        for item in patient_items:
            if item.split != main:
                detail = f"its patient id has images in several splits ({spread})"
                findings.append(Finding(item.name, "patient_leak", ERROR, detail, anchor.name))
    return findings
