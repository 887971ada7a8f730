"""Duplicates: exact (SHA-256 of the file bytes or of the decoded pixels), near (perceptual hash confirmed
by pixels), and similar in a backbone's feature space; each pair classified by what it breaks.

A pair under two labels is a label conflict; in two splits, a leak; under two patient ids, a patient
leak (patient-grouped splits cannot keep the copies together); otherwise a harmless duplicate. The
perceptual hash is ``imagehash.phash`` (DCT hash of the grey image, 64 bits). On small, look-alike
medical images it also matches different images with the same layout (a dark blob on skin), so a pair
must also differ by at most ``max_pixel_difference`` grey levels on average (at 32x32 px, per channel)
to count as a near copy. Feature-space pairs (cosine similarity of backbone features) are reported as
warnings whatever their class: a backbone cannot tell one lesion photographed twice from two lesions
that look alike.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from fewshot_med.audit.findings import ERROR, INFO, WARNING, Finding
from fewshot_med.audit.inventory import Item
from fewshot_med.data.transforms import resize_images

#: Pair rows compared at once (memory: rows x N).
CHUNK = 1024
#: Side the pixel confirmation of a near pair compares images at.
COMPARE_SIZE = 32


@dataclass(frozen=True)
class DuplicateLimits:
    """When two images count as the same.

    Attributes:
        phash_distance: most differing bits of two 64-bit perceptual hashes.
        max_pixel_difference: most mean absolute difference (grey levels, 0-255) at 32x32 px.
        feature_cosine: least cosine similarity of two backbone feature vectors.
    """

    phash_distance: int = 4
    max_pixel_difference: float = 4.0
    feature_cosine: float = 0.98


def classify(first: Item, second: Item) -> tuple[str, str]:
    """The check and severity of a pair of copies: ``label_conflict`` > ``split_leak`` >
    ``patient_leak`` (errors) > ``duplicate`` (info)."""
    if first.label != second.label:
        return "label_conflict", ERROR
    if first.split is not None and second.split is not None and first.split != second.split:
        return "split_leak", ERROR
    if first.patient is not None and second.patient is not None and first.patient != second.patient:
        return "patient_leak", ERROR
    return "duplicate", INFO


def _pair_detail(first: Item, second: Item, evidence: str) -> str:
    """``"<evidence>; labels a / b, splits train / test"``: what differs, never paths or patient ids."""
    parts = [evidence]
    if first.label != second.label:
        parts.append(f"labels {first.label} / {second.label}")
    else:
        parts.append(f"both {first.label}")
    if first.split is not None and second.split is not None:
        parts.append(
            f"splits {first.split} / {second.split}" if first.split != second.split else f"both {first.split}"
        )
    if first.patient is not None and second.patient is not None and first.patient != second.patient:
        parts.append("different patient ids")
    return "; ".join(parts)


def _digest_pairs(digests: Sequence[str]) -> Iterator[tuple[int, int]]:
    """``(first, other)`` for each item whose digest an earlier item has (``""`` is skipped)."""
    first_of: dict[str, int] = {}
    for index, digest in enumerate(digests):
        if not digest:
            continue
        if digest in first_of:
            yield first_of[digest], index
        else:
            first_of[digest] = index


def pixel_digests(images: np.ndarray, mask: np.ndarray) -> list[str]:
    """SHA-256 of each image's pixels where ``mask`` (``""`` elsewhere); ``images`` ``(N, H, W, C)``."""
    return [
        hashlib.sha256(image.tobytes()).hexdigest() if keep else ""
        for image, keep in zip(images, mask, strict=True)
    ]


def perceptual_hashes(images: np.ndarray) -> np.ndarray:
    """``(N,)`` uint64 ``imagehash.phash`` of ``(N, H, W, C)`` uint8 images."""
    import imagehash
    from PIL import Image

    hashes = [
        imagehash.phash(Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image))
        for image in images
    ]
    return np.asarray([int(str(value), 16) for value in hashes], dtype=np.uint64)


def _close_pairs(
    distance_rows: Iterator[tuple[int, np.ndarray]], keep: object
) -> list[tuple[int, int, float]]:
    """``(i, j, value)`` with ``i < j`` where ``keep(value)`` holds, from row blocks of a pair matrix."""
    pairs = []
    for start, block in distance_rows:
        rows, columns = np.nonzero(keep(block))
        for row, column in zip(rows, columns, strict=True):
            if start + row < column:
                pairs.append((int(start + row), int(column), float(block[row, column])))
    return pairs


def hash_pairs(hashes: np.ndarray, max_distance: int) -> list[tuple[int, int, float]]:
    """Pairs of ``(N,)`` uint64 hashes at most ``max_distance`` bits apart: ``(i, j, distance)``,
    ``i < j``."""
    blocks = (
        (start, np.bitwise_count(hashes[start : start + CHUNK, None] ^ hashes[None, :]))
        for start in range(0, len(hashes), CHUNK)
    )
    return _close_pairs(blocks, lambda block: block <= max_distance)


def cosine_pairs(features: np.ndarray, min_cosine: float) -> list[tuple[int, int, float]]:
    """Pairs of ``(N, D)`` feature rows with cosine similarity at least ``min_cosine``: ``(i, j, cosine)``."""
    unit = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    blocks = ((start, unit[start : start + CHUNK] @ unit.T) for start in range(0, len(unit), CHUNK))
    return _close_pairs(blocks, lambda block: block >= min_cosine)


def find_duplicates(
    items: Sequence[Item],
    images: np.ndarray,
    readable: np.ndarray,
    byte_digests: Sequence[str] | None = None,
    features: np.ndarray | None = None,
    limits: DuplicateLimits = DuplicateLimits(),
) -> list[Finding]:
    """Flag every pair of copies, each pair once with its strongest evidence (bytes > pixels > perceptual
    hash > features).

    Args:
        items: the images.
        images: ``(N, H, W, C)`` uint8 pixels (rows of unreadable items are ignored).
        readable: ``(N,)`` bool.
        byte_digests: SHA-256 of each file's bytes (``""`` for unreadable), ``None`` for arrays.
        features: ``(N, D)`` backbone features (rows of unreadable items ignored), or ``None``.
        limits: thresholds.

    Returns:
        One finding per pair: ``item`` the later image, ``related_item`` the earlier one.
    """
    index = np.flatnonzero(readable)
    found: dict[tuple[int, int], tuple[str, bool]] = {}  # pair -> (evidence, strong)

    def add(pairs: Iterator[tuple[int, int]] | list[tuple[int, int]], evidence: str, strong: bool) -> None:
        for pair in pairs:
            found.setdefault(pair, (evidence, strong))

    if byte_digests is not None:
        add(_digest_pairs(byte_digests), "identical file bytes (SHA-256)", True)
    add(_digest_pairs(pixel_digests(images, readable)), "identical pixels (SHA-256)", True)
    small = resize_images(images[index], COMPARE_SIZE).astype(np.float32)
    for i, j, distance in hash_pairs(perceptual_hashes(images[index]), limits.phash_distance):
        difference = float(np.abs(small[i] - small[j]).mean())
        if difference <= limits.max_pixel_difference:
            evidence = f"near copy: phash distance {distance:.0f}, mean pixel difference {difference:.1f}"
            add([(int(index[i]), int(index[j]))], evidence, True)
    if features is not None:
        for i, j, cosine in cosine_pairs(features[index], limits.feature_cosine):
            add([(int(index[i]), int(index[j]))], f"similar features: cosine {cosine:.3f}", False)
    findings = []
    for (first, second), (evidence, strong) in sorted(found.items()):
        check, severity = classify(items[first], items[second])
        if not strong:
            severity = WARNING if check != "duplicate" else INFO
        detail = _pair_detail(items[first], items[second], evidence)
        findings.append(Finding(items[second].name, check, severity, detail, items[first].name))
    return findings
