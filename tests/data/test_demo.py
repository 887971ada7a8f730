import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import NearestCentroid
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from fewshot_med.data.dataset import SPLITS
from fewshot_med.data.demo import (
    DEMO_BASE_CLASSES,
    DEMO_CLASS_NAMES,
    DEMO_NOVEL_CLASSES,
    make_demo_dataset,
)
from fewshot_med.errors import DataError

SMALL = {"images_per_common_class": 40, "images_per_rare_class": 40}
RARE = [DEMO_CLASS_NAMES.index(name) for name in DEMO_NOVEL_CLASSES]


@pytest.fixture(scope="module")
def demo():
    return make_demo_dataset()


def _pixels(split):
    return split.images.reshape(len(split), -1).astype(np.float32) / 255


def test_class_lists():
    assert len(DEMO_BASE_CLASSES) == 5 and len(DEMO_NOVEL_CLASSES) == 3
    assert DEMO_CLASS_NAMES == DEMO_BASE_CLASSES + DEMO_NOVEL_CLASSES
    assert len(set(DEMO_CLASS_NAMES)) == 8


def test_same_seed_same_bytes_other_seed_differs():
    first = make_demo_dataset(seed=3, image_size=16, **SMALL)
    again = make_demo_dataset(seed=3, image_size=16, **SMALL)
    other = make_demo_dataset(seed=4, image_size=16, **SMALL)
    assert first.digest == again.digest != other.digest
    for name in SPLITS:
        assert np.array_equal(first.splits[name].images, again.splits[name].images)
        assert np.array_equal(first.splits[name].groups, again.splits[name].groups)
    assert "seed=3" in first.source and "seed=4" in other.source


@pytest.mark.parametrize("size", [28, 32, 64])
def test_shapes_and_dtypes(size):
    dataset = make_demo_dataset(image_size=size, **SMALL)
    assert dataset.name == "demo" and dataset.class_names == DEMO_CLASS_NAMES
    assert dataset.source.startswith(f"generated:demo?seed=0&image_size={size}&")
    assert dataset.image_shape == (size, size, 3)
    for split in dataset.splits.values():
        assert split.images.shape == (len(split), size, size, 3) and split.images.dtype == np.uint8
        assert split.labels.shape == (len(split),) and split.labels.dtype == np.int64
        assert split.groups.shape == (len(split),) and split.groups.dtype.kind == "U"
        assert split.images.std() > 10  # not blank: lesions, skin tones and noise vary


def test_class_counts_match_request(demo):
    total = sum(demo.class_counts().values())
    assert total.tolist() == [500] * 5 + [150] * 3
    custom = make_demo_dataset(image_size=16, images_per_common_class=60, images_per_rare_class=45)
    assert sum(custom.class_counts().values()).tolist() == [60] * 5 + [45] * 3


def test_every_split_has_every_class_and_rare_test_sets_are_big_enough(demo):
    counts = demo.class_counts()
    assert all((counts[name] > 0).all() for name in SPLITS)
    assert (counts["test"][RARE] >= 25).all()


def test_patients_have_one_to_three_images_of_one_class_in_one_split(demo):
    seen = {name: set(demo.splits[name].groups) for name in SPLITS}
    assert not seen["train"] & seen["val"] and not seen["train"] & seen["test"]
    assert not seen["val"] & seen["test"]
    groups = np.concatenate([demo.splits[name].groups for name in SPLITS])
    labels = np.concatenate([demo.splits[name].labels for name in SPLITS])
    patients, index, sizes = np.unique(groups, return_inverse=True, return_counts=True)
    assert sizes.min() >= 1 and sizes.max() <= 3
    class_of_patient = np.full(len(patients), -1)
    class_of_patient[index] = labels
    assert np.array_equal(class_of_patient[index], labels)


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_raw_pixels_are_not_linearly_separable(demo):
    # measured test accuracy, seeds 0-4: 0.57-0.60 here, 0.56-0.62 converged (a small CNN: ~0.86)
    train, test = demo.splits["train"], demo.splits["test"]
    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.01, max_iter=100))
    with threadpool_limits(1):  # multithreaded BLAS crawls on a busy machine
        accuracy = model.fit(_pixels(train), train.labels).score(_pixels(test), test.labels)
    assert 0.3 < accuracy < 0.75  # well above chance (0.125), far from perfect


def test_rare_classes_are_not_separated_by_raw_pixel_centroids(demo):
    # measured: 0.34-0.50 over seeds 0-3 (chance: 0.33)
    train, test = demo.splits["train"], demo.splits["test"]
    in_train, in_test = np.isin(train.labels, RARE), np.isin(test.labels, RARE)
    model = NearestCentroid().fit(_pixels(train)[in_train], train.labels[in_train])
    assert model.score(_pixels(test)[in_test], test.labels[in_test]) < 0.65


@pytest.mark.parametrize(
    ("argument", "value"),
    [
        ("image_size", 15),
        ("image_size", 32.0),
        ("images_per_common_class", 39),
        ("images_per_rare_class", 10),
        ("images_per_rare_class", True),
    ],
)
def test_invalid_arguments_raise(argument, value):
    with pytest.raises(DataError, match=f"{argument}={value!r} is invalid; pass an integer >= "):
        make_demo_dataset(**{argument: value})
