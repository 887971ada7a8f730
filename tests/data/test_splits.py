import numpy as np
import pytest

from fewshot_med.data.splits import assign_splits
from fewshot_med.errors import DataError


def test_grouped_stratified_and_reproducible():
    rng = np.random.default_rng(1)
    groups = rng.integers(0, 400, 2000)
    labels = groups % 4  # one class per patient, as for lesions
    splits = assign_splits(labels, groups, (0.7, 0.1, 0.2), seed=5)
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not set(groups[splits == a]) & set(groups[splits == b])
    fractions = [np.mean(splits == s) for s in ("train", "val", "test")]
    assert fractions == pytest.approx([0.7, 0.1, 0.2], abs=0.03)
    for split in ("train", "val", "test"):  # every class in every split, in proportion
        share = np.bincount(labels[splits == split], minlength=4) / np.sum(splits == split)
        assert share == pytest.approx(np.bincount(labels) / len(labels), abs=0.05)
    assert np.array_equal(splits, assign_splits(labels, groups, (0.7, 0.1, 0.2), seed=5))
    assert not np.array_equal(splits, assign_splits(labels, groups, (0.7, 0.1, 0.2), seed=6))


def test_bad_fractions_and_too_few_groups():
    with pytest.raises(DataError, match="summing to 1"):
        assign_splits(np.zeros(10, int), None, (0.5, 0.5, 0.5))
    with pytest.raises(DataError, match="only 2 patient group"):
        assign_splits(np.zeros(10, int), np.repeat([0, 1], 5))


def test_a_single_split_takes_every_image_however_few():
    labels = np.array([0, 0, 1, 1])  # two per class: too few to cut into three splits
    assert list(assign_splits(labels, fractions=(1, 0, 0))) == ["train"] * 4
    assert list(assign_splits(labels, np.array(["a", "a", "b", "b"]), fractions=(0, 0, 1))) == ["test"] * 4
