from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fewshot_med.config import DataConfig
from fewshot_med.data import LoadOptions, load_dataset
from fewshot_med.data.npz import read_medmnist_npz
from fewshot_med.errors import DataError


def _write_npz(path: Path, n: int = 6, size: int = 8, rgb: bool = True, **replace) -> Path:
    rng = np.random.default_rng(0)
    shape = (n, size, size, 3) if rgb else (n, size, size)
    arrays = {}
    for split in ("train", "val", "test"):
        arrays[f"{split}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 3).reshape(-1, 1)
    arrays.update(replace)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    np.savez(path, **arrays)
    return path


@pytest.mark.real_data
def test_ham10000_counts_match_source(shared_data):
    dataset = load_dataset("ham10000")
    assert dataset.class_names == ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
    assert dataset.image_shape == (64, 64, 3)
    counts = dataset.class_counts()
    # Per-class counts from ../shared/data/ham10000_derma/SOURCE.md
    assert counts["train"].tolist() == [237, 354, 779, 80, 795, 4702, 101]
    assert counts["val"].tolist() == [29, 56, 100, 10, 109, 661, 12]
    assert counts["test"].tolist() == [61, 104, 220, 25, 209, 1342, 29]
    total = sum(counts.values())
    assert (total[0], total[5], total[6]) == (327, 6705, 142)


@pytest.mark.real_data
def test_pbc_counts_and_grey_breastmnist(shared_data):
    pbc = load_dataset("pbc")
    assert pbc.class_counts()["test"].tolist() == [243, 623, 310, 579, 243, 284, 666, 469]
    breast = read_medmnist_npz(shared_data / "breastmnist/breastmnist.npz")  # labels saved as (N,)
    assert breast.image_shape == (28, 28, 1)
    assert breast.class_names == ("class_0", "class_1")
    assert [len(breast.splits[s]) for s in ("train", "val", "test")] == [546, 78, 156]


@pytest.mark.real_data
def test_copied_catalogue_file_keeps_class_names(shared_data, tmp_path):
    copy = tmp_path / "pbc_bloodcells_28.npz"
    copy.symlink_to(shared_data / "pbc_bloodcells/pbc_bloodcells_28.npz")
    assert load_dataset(str(copy)).class_names[0] == "basophil"


def test_grey_images_and_flat_labels(tmp_path):
    path = _write_npz(tmp_path / "grey.npz", rgb=False)
    dataset = read_medmnist_npz(path, class_names=["a", "b", "c"])
    assert dataset.image_shape == (8, 8, 1)
    assert dataset.splits["train"].labels.dtype == np.int64
    assert dataset.splits["train"].labels.tolist() == [0, 1, 2, 0, 1, 2]


def test_digest_depends_on_content(tmp_path):
    first = read_medmnist_npz(_write_npz(tmp_path / "a.npz"))
    same = read_medmnist_npz(_write_npz(tmp_path / "b.npz"))
    labels = np.array([0, 1, 2, 2, 1, 0])
    other = read_medmnist_npz(_write_npz(tmp_path / "c.npz", train_labels=labels))
    assert first.digest == same.digest
    assert first.digest != other.digest


def test_missing_key_is_named(tmp_path):
    path = _write_npz(tmp_path / "bad.npz", val_labels=None)
    with pytest.raises(DataError, match=r"bad\.npz: missing key\(s\) \['val_labels'\]"):
        read_medmnist_npz(path)


def test_label_out_of_range_is_named(tmp_path):
    path = _write_npz(tmp_path / "bad.npz", test_labels=np.array([0, 1, 2, 0, 1, 7]))
    with pytest.raises(DataError, match=r"test label 7 is out of range for 3 classes"):
        read_medmnist_npz(path, class_names=["a", "b", "c"])


def test_truncated_file(tmp_path):
    path = _write_npz(tmp_path / "full.npz", size=32)
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError, match=r"truncated\.npz: .*re-download"):
        read_medmnist_npz(truncated)


def test_missing_file_and_unknown_spec(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_medmnist_npz(tmp_path / "absent.npz")
    with pytest.raises(DataError, match="dataset 'nonsense' not found: give a catalogue name"):
        load_dataset("nonsense")


def test_medmnist_reads_from_its_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDMNIST_ROOT", str(tmp_path))
    _write_npz(tmp_path / "bloodmnist.npz", n=8)
    dataset = load_dataset("medmnist:bloodmnist")
    assert dataset.class_names[0] == "basophil"
    assert dataset.name == "bloodmnist_28"


def test_medmnist_unknown_name_and_size():
    with pytest.raises(DataError, match="unknown MedMNIST dataset 'skinmnist'"):
        load_dataset("medmnist:skinmnist")
    with pytest.raises(DataError, match="has no size 32"):
        load_dataset("medmnist:dermamnist@32")


def test_image_size_resizes_npz_files_and_unset_keeps_their_size(tmp_path):
    path = _write_npz(tmp_path / "x.npz", size=8)
    native = load_dataset(str(path))
    assert native.image_shape == (8, 8, 3)
    resized = load_dataset(str(path), LoadOptions(image_size=16))
    assert resized.image_shape == (16, 16, 3) and resized.digest != native.digest
    for name, split in resized.splits.items():
        np.testing.assert_array_equal(split.labels, native.splits[name].labels)
    expected = F.interpolate(
        torch.from_numpy(native.splits["train"].images).permute(0, 3, 1, 2).float(),
        size=(16, 16),
        mode="bilinear",
        antialias=True,
    )
    expected = expected.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(resized.splits["train"].images, expected)
    assert load_dataset(str(path), LoadOptions(image_size=8)).digest == native.digest
    assert DataConfig(source=str(path)).load_options().image_size is None  # unset by default
