"""Each check on small hand-made inputs, against a hand count or a library computing the same thing."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from scipy.spatial.distance import mahalanobis
from sklearn.metrics.pairwise import cosine_similarity

from fewshot_med.audit import ERROR, INFO, WARNING, Item
from fewshot_med.audit.classes import find_small_classes
from fewshot_med.audit.duplicates import classify, cosine_pairs, hash_pairs
from fewshot_med.audit.files import scan_files
from fewshot_med.audit.ood import find_out_of_distribution, fit_reference
from fewshot_med.audit.patients import find_patient_leaks
from fewshot_med.robustness.label_issues import knn_disagreement


@pytest.mark.parametrize(
    ("second", "expected"),
    [
        (Item("b", "mel", "test", "p2"), ("label_conflict", ERROR)),  # label first, whatever else differs
        (Item("b", "nv", "test", "p1"), ("split_leak", ERROR)),
        (Item("b", "nv", "train", "p2"), ("patient_leak", ERROR)),
        (Item("b", "nv", "train", "p1"), ("duplicate", INFO)),
        (Item("b", "nv", None, None), ("duplicate", INFO)),  # unknown split or patient: no leak claimed
    ],
)
def test_a_pair_of_copies_is_classified_by_what_it_breaks(second, expected):
    assert classify(Item("a", "nv", "train", "p1"), second) == expected


def test_hash_pairs_match_a_bit_count_of_every_pair():
    rng = np.random.default_rng(0)
    hashes = rng.integers(0, 2**63, size=300, dtype=np.uint64)
    hashes[1::3] = hashes[::3][: len(hashes[1::3])] ^ np.uint64(0b1011)  # 3 bits from their neighbour
    found = {(i, j) for i, j, _ in hash_pairs(hashes, 3)}
    expected = {
        (i, j)
        for i in range(len(hashes))
        for j in range(i + 1, len(hashes))
        if bin(int(hashes[i]) ^ int(hashes[j])).count("1") <= 3
    }
    assert found == expected and len(expected) >= 100


def test_cosine_pairs_match_scikit_learn():
    rng = np.random.default_rng(1)
    features = rng.normal(size=(50, 8))
    features[25:] = features[:25] + rng.normal(scale=0.05, size=(25, 8))
    similarity = cosine_similarity(features)
    expected = {(i, j) for i in range(50) for j in range(i + 1, 50) if similarity[i, j] >= 0.99}
    assert {(i, j) for i, j, _ in cosine_pairs(features, 0.99)} == expected and expected


def test_knn_disagreement_flags_a_point_labelled_like_the_other_cluster():
    rng = np.random.default_rng(2)
    features = np.concatenate([rng.normal(size=(20, 4)) + 5, rng.normal(size=(20, 4)) - 5])
    labels = np.repeat([0, 1], 20)
    labels[3] = 1  # a point of cluster 0 labelled 1
    plurality, disagreement, neighbours = knn_disagreement(features, labels, k=5)
    assert np.flatnonzero(plurality != labels).tolist() == [3]
    assert plurality[3] == 0 and disagreement[3] == 1.0
    assert 3 not in neighbours[3] and neighbours.shape == (40, 5)


def test_patient_leaks_flag_the_images_outside_the_patients_main_split():
    items = [
        Item("a", "nv", "train", "p1"),
        Item("b", "nv", "test", "p1"),
        Item("c", "nv", "train", "p1"),
        Item("d", "nv", "val", "p2"),
        Item("e", "nv", "test", "p2"),
        Item("f", "nv", "test", "p3"),
        Item("g", "nv", None, "p3"),
    ]
    found = {(f.item, f.related_item) for f in find_patient_leaks(items)}
    assert found == {("b", "a"), ("e", "d")}  # p2's tie goes to the earlier split, val


def test_small_classes_count_readable_images_per_split():
    items = [Item(str(i), "df", "val") for i in range(6)] + [Item("x", "nv", "val"), Item("y", "nv", "train")]
    readable = np.array([True] * 5 + [False, True, True])
    found = {(f.item, f.detail) for f in find_small_classes(items, readable, ["df", "nv"], [1, 5, 10])}
    assert found == {
        ("df", "train: 0 readable image(s); K = 1, 5, 10 needs K + 1 (K support, 1 query)"),
        ("df", "val: 5 readable image(s); K = 5, 10 needs K + 1 (K support, 1 query)"),
        ("df", "test: 0 readable image(s); K = 1, 5, 10 needs K + 1 (K support, 1 query)"),
        ("nv", "train: 1 readable image(s); K = 1, 5, 10 needs K + 1 (K support, 1 query)"),
        ("nv", "val: 1 readable image(s); K = 1, 5, 10 needs K + 1 (K support, 1 query)"),
        ("nv", "test: 0 readable image(s); K = 1, 5, 10 needs K + 1 (K support, 1 query)"),
    }


def test_mahalanobis_scores_match_scipy_and_flag_a_far_image():
    rng = np.random.default_rng(3)
    features = np.concatenate([rng.normal(size=(200, 3)), rng.normal(size=(200, 3)) + 4])
    labels = np.repeat([0, 1], 200)
    reference = fit_reference(features, labels, 0.99, "test data")
    point = np.array([[1.0, -2.0, 0.5]])
    expected = min(mahalanobis(point[0], mean, reference.precision) ** 2 for mean in reference.means)
    assert reference.scores(point)[0] == pytest.approx(expected)
    own = reference.scores(features)
    assert (own > reference.threshold).sum() == 4  # the top 1% of 400, by construction
    items = [Item("near", "nv"), Item("far", "nv")]
    far = np.array([[0.1, 0.0, 0.2], [30.0, -30.0, 30.0]])
    (finding,) = find_out_of_distribution(items, far, np.array([True, True]), reference)
    assert finding.item == "far" and finding.severity == WARNING


def test_file_checks_read_headers_and_magic_bytes(tmp_path):
    pixels = np.random.default_rng(4).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "png_named.jpg", format="PNG")
    Image.fromarray(pixels).save(tmp_path / "png_named.dcm", format="PNG")
    Image.fromarray(pixels).save(tmp_path / "good.png")
    Image.fromarray(np.zeros((200, 40, 3), np.uint8)).save(tmp_path / "strip.png")
    (tmp_path / "empty.png").write_bytes(b"")
    names = ["png_named.jpg", "png_named.dcm", "good.png", "strip.png", "empty.png"]
    items = [Item(name, "nv", path=tmp_path / name) for name in names]
    scan = scan_files(items, image_size=16)
    found = {(f.item, f.check, f.severity) for f in scan.findings}
    assert found == {
        ("png_named.jpg", "wrong_extension", WARNING),  # Pillow reads it anyway
        ("png_named.dcm", "wrong_extension", ERROR),  # the DICOM reader cannot
        ("strip.png", "extreme_aspect", WARNING),
        ("empty.png", "empty_file", ERROR),
    }
    assert scan.readable.tolist() == [True, False, True, True, False]
    assert scan.images.shape == (5, 16, 16, 3) and scan.byte_digests[1] == scan.byte_digests[4] == ""
    assert all("/" not in f.detail for f in scan.findings)
