"""Bad local data as a new user brings it: refused with one line naming the rows, or read as asked."""

import itertools
import shutil
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from fewshot_med.audit.inventory import list_items
from fewshot_med.config import DataConfig
from fewshot_med.data import LoadOptions, load_dataset
from fewshot_med.data.local import read_manifest
from fewshot_med.data.readers import read_image
from fewshot_med.errors import DataError
from tests.data.test_corrupt_corpus import declared_png
from tests.test_cli import run

OPTIONS = LoadOptions(image_size=16)


def _images(folder: Path, count: int, seed: int = 0) -> list[str]:
    """``count`` distinct random RGB PNGs in ``folder``; their names relative to its parent."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return [f"{folder.name}/{i}.png" for i in range(count)]


def _manifest(tmp_path: Path, rows: list[str], header: str = "path,label", name: str = "m.csv") -> Path:
    path = tmp_path / name
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return path


def _doubled(tmp_path: Path) -> Path:
    """The user's case: 14 images in two classes, every row written twice, no patient ids."""
    rows = [f"{name},{'ab'[i % 2]}" for i, name in enumerate(_images(tmp_path / "img", 14))]
    return _manifest(tmp_path, rows + rows)


def _one_line(error: pytest.ExceptionInfo, *fragments: str) -> str:
    message = str(error.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_a_doubled_manifest_is_refused_naming_both_lines(tmp_path):
    manifest = _doubled(tmp_path)
    with pytest.raises(DataError) as error:
        load_dataset(str(manifest), OPTIONS)
    _one_line(error, "m.csv:2 (img/0.png) and ", "m.csv:16 (img/0.png)", "the same file is listed twice")
    _one_line(error, "label 'a'", "data.duplicates: keep_first")


def test_keep_first_drops_the_copies_with_a_warning_and_nothing_leaks(tmp_path):
    manifest = _doubled(tmp_path)
    with pytest.warns(UserWarning, match=r"14 copies dropped, the first of each image kept"):
        dataset = load_dataset(str(manifest), LoadOptions(image_size=16, duplicates="keep_first"))
    assert sum(len(dataset.splits[s]) for s in ("train", "val", "test")) == 14
    seen = {split: {image.tobytes() for image in dataset.splits[split].images} for split in dataset.splits}
    assert not any(seen[a] & seen[b] for a, b in itertools.combinations(seen, 2))


def test_one_image_under_two_labels_is_found_by_content(tmp_path):
    names = _images(tmp_path / "img", 6)
    shutil.copy(tmp_path / names[0], tmp_path / "img" / "copy.png")  # another path, the same pixels
    rows = [f"{name},{'ab'[i % 2]}" for i, name in enumerate(names)] + ["img/copy.png,b"]
    with pytest.raises(DataError) as error:
        load_dataset(str(_manifest(tmp_path, rows)), OPTIONS)
    _one_line(error, "m.csv:2 (img/0.png) and ", "m.csv:8 (img/copy.png)", "identical image content")
    _one_line(error, "under two labels ('a' and 'b')")


def test_a_copy_in_two_given_splits_is_refused_as_a_leak(tmp_path):
    names = _images(tmp_path / "img", 6)
    Image.open(tmp_path / names[1]).save(tmp_path / "img" / "resaved.bmp")  # other bytes, same pixels
    splits = ["train", "train", "val", "val", "test", "test"]
    rows = [f"{name},a,{split}" for name, split in zip(names, splits, strict=True)]
    rows.append("img/resaved.bmp,a,test")
    with pytest.raises(DataError) as error:
        load_dataset(str(_manifest(tmp_path, rows, header="path,label,split")), OPTIONS)
    _one_line(error, "(img/1.png) and ", "(img/resaved.bmp)", "in splits train and test", "leaks")


def test_the_same_image_in_two_class_folders_is_refused(tmp_path):
    _images(tmp_path / "data" / "benign", 4)
    _images(tmp_path / "data" / "malignant", 4, seed=1)
    shutil.copy(tmp_path / "data" / "benign" / "2.png", tmp_path / "data" / "malignant" / "x.png")
    with pytest.raises(DataError) as error:
        load_dataset(str(tmp_path / "data"), OPTIONS)
    _one_line(error, "benign/2.png and ", "malignant/x.png", "('benign' and 'malignant')")


@pytest.mark.parametrize("other", ["Nevus", " ne vus", "NEVUS"])
def test_labels_differing_in_case_or_spacing_are_refused(tmp_path, other):
    names = _images(tmp_path / "img", 4)
    rows = [f"{names[0]},nevus", f"{names[1]},mel", f'{names[2]},"{other.replace(" ", "  ")}"']
    path = _manifest(tmp_path, rows)
    expected = other.strip().replace(" ", "  ")
    with pytest.raises(DataError) as error:
        read_manifest(path, image_size=16)  # refused even where copies are left to an audit
    _one_line(error, "labels 'nevus' (", "m.csv:2 (img/0.png)) and ", f"'{expected}' (", "case or spacing")


def test_the_audit_still_lists_copies_to_report_them(tmp_path):
    inventory = list_items(_doubled(tmp_path))
    assert len(inventory.items) == 28 and inventory.class_names == ("a", "b")


def _write_4d(path: Path, volumes: int) -> np.ndarray:
    data = np.random.default_rng(0).normal(100, 20, (16, 16, 3, volumes)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    return data


def test_a_4d_nifti_needs_a_volume_index(tmp_path):
    for k, cls in enumerate(("a", "b")):
        (tmp_path / "data" / cls).mkdir(parents=True)
        for i in range(3):
            nib.save(
                nib.Nifti1Image(np.random.default_rng(i + 10 * k).random((16, 16, 3)), np.eye(4)),
                tmp_path / "data" / cls / f"{cls}{i}.nii",
            )
    volume = _write_4d(tmp_path / "data" / "a" / "4d.nii.gz", volumes=3)
    with pytest.raises(DataError) as error:
        load_dataset(str(tmp_path / "data"), OPTIONS)
    _one_line(error, "4d.nii.gz: 4D NIfTI file with 3 volumes", "data.volume_index (0 to 2)")
    config = DataConfig(source=str(tmp_path / "data"), image_size=16, volume_index=2)
    dataset = load_dataset(config.source, config.load_options())
    assert dataset.image_shape == (16, 16, 1)  # grey stays grey: volumes are not colour channels
    (tmp_path / "one").mkdir()
    nib.save(nib.Nifti1Image(volume[..., 2], np.eye(4)), tmp_path / "one" / "v.nii")
    assert np.array_equal(
        read_image(tmp_path / "data" / "a" / "4d.nii.gz", 16, volume_index=2),
        read_image(tmp_path / "one" / "v.nii", 16),
    )
    with pytest.raises(DataError, match=r"volume_index 5 is outside the file's 3 volumes"):
        read_image(tmp_path / "data" / "a" / "4d.nii.gz", 16, volume_index=5)


def _npz(path: Path, labels: np.ndarray) -> Path:
    images = np.zeros((len(labels), 8, 8), np.uint8)
    arrays = {f"{s}_images": images for s in ("train", "val", "test")}
    arrays |= {f"{s}_labels": labels for s in ("train", "val", "test")}
    np.savez(path, **arrays)
    return path


def test_npz_labels_must_be_contiguous_ids(tmp_path):
    with pytest.raises(DataError) as error:
        load_dataset(str(_npz(tmp_path / "x.npz", np.array([0, 1, 2, 99, 1]))))
    _one_line(error, "x.npz: label(s) 99 (3 images) are not among the ids 0..3", "data.class_names")
    labels = np.array([0, 1, 1])
    assert load_dataset(str(_npz(tmp_path / "ok.npz", labels))).class_names == ("class_0", "class_1")
    with pytest.raises(DataError) as error:
        load_dataset(str(_npz(tmp_path / "y.npz", labels)), LoadOptions(class_names=["only"]))
    _one_line(
        error, "y.npz: train label 1 is out of range for 1 classes ['only']", "(outside 0..0: 1 (2 images))"
    )


def test_a_latin1_manifest_is_refused_or_read_as_stated(tmp_path):
    names = _images(tmp_path / "img", 9)
    text = "path,label\n" + "".join(f"{name},{'névus' if i % 3 else 'mel'}\n" for i, name in enumerate(names))
    path = tmp_path / "latin.csv"
    path.write_bytes(text.encode("latin-1"))
    offset = text.encode("latin-1").index(b"\xe9")
    with pytest.raises(DataError) as error:
        load_dataset(str(path), OPTIONS)
    _one_line(error, f"latin.csv: not utf-8 text (byte 0xe9 at offset {offset})", "data.manifest_encoding")
    stated = LoadOptions(image_size=16, manifest_encoding="latin-1", split_fractions=(1.0, 0.0, 0.0))
    assert load_dataset(str(path), stated).class_names == ("mel", "névus")
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))  # UTF-8 with a byte-order mark
    utf8 = LoadOptions(image_size=16, split_fractions=(1.0, 0.0, 0.0))
    assert load_dataset(str(path), utf8).class_names == ("mel", "névus")
    with pytest.raises(DataError, match=r"data.manifest_encoding 'klingon': unknown encoding"):
        load_dataset(str(path), LoadOptions(manifest_encoding="klingon"))


def test_zero_byte_and_oversized_images_say_so(tmp_path):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(DataError) as error:
        read_image(empty, 16)
    _one_line(error, "empty.jpg: cannot read this pil image (empty file, 0 bytes)")
    huge = tmp_path / "huge.png"
    huge.write_bytes(declared_png(20000, 20000))  # 400 M pixels declared in a few bytes
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DataError) as error:
            read_image(huge, 16)
    _one_line(error, "huge.png: cannot read this pil image (too large: 400000000 pixels", "MAX_IMAGE_PIXELS")


def test_data_config_refuses_an_unknown_duplicates_policy():
    with pytest.raises(ValueError, match="duplicates"):
        DataConfig(source="demo", duplicates="ignore")


def test_cli_prints_one_line_and_exits_2(tmp_path):
    result = run("datasets", "info", str(_doubled(tmp_path)))
    assert result.returncode == 2
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert "m.csv:2 (img/0.png)" in lines[0] and "m.csv:16 (img/0.png)" in lines[0]
