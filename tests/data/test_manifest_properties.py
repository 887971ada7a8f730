"""Properties of manifest parsing, copy detection and the readers, over inputs hypothesis makes up."""

import csv
import io
import itertools
import tempfile
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from fewshot_med.data.local import manifest_rows, read_manifest
from fewshot_med.data.readers import MAGIC_NUMBERS, READER_BY_SUFFIX, read_image
from fewshot_med.errors import DataError


def _settings(examples: int) -> settings:
    """No deadline (the machine may be busy), no example database in the checkout."""
    return settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture],
    )


#: any text but NUL and lone surrogates (not encodable); commas, quotes and newlines included
CELL = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), max_size=12)


def _csv(rows: list[tuple[str, str]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)  # "\r\n" line ends: fields holding "\r" or "\n" are quoted
    writer.writerows([("path", "label"), *rows])
    return buffer.getvalue()


@_settings(30)
@given(rows=st.lists(st.tuples(CELL, CELL), min_size=1, max_size=8), bom=st.booleans())
def test_manifest_rows_read_back_what_csv_wrote(tmp_path, rows, bom):
    path = tmp_path / "m.csv"
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + _csv(rows).encode("utf-8"))
    columns, read = manifest_rows(path)
    assert columns == ["path", "label"]
    assert [(row["path"], row["label"]) for _, row in read] == [(p.strip(), lbl.strip()) for p, lbl in rows]
    lines = [line for line, _ in read]
    assert lines == sorted(set(lines)) and lines[0] >= 2
    if not any("\n" in p + lbl or "\r" in p + lbl for p, lbl in rows):
        assert lines == list(range(2, len(rows) + 2))  # one physical line per row: exact line numbers


@_settings(30)
@given(text=st.text(st.characters(min_codepoint=1, max_codepoint=255), min_size=1, max_size=40))
def test_a_manifest_that_is_not_utf8_is_refused_at_its_first_bad_byte(tmp_path, text):
    path = tmp_path / "latin.csv"
    data = _csv([("a.png", text)]).encode("latin-1")
    path.write_bytes(data)
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as error:
        with pytest.raises(DataError) as refused:
            manifest_rows(path)
        message = str(refused.value)
        assert "\n" not in message and message.startswith(f"{path}: not utf-8 text ")
        assert f"(byte 0x{data[error.start]:02x} at offset {error.start})" in message
        _, rows = manifest_rows(path, encoding="latin-1")  # the stated encoding reads it
        assert rows[0][1]["label"] == text.strip()
    else:
        assert len(manifest_rows(path)[1]) == 1  # latin-1 bytes that happen to be UTF-8 ("Ã©"): read


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str], list[int]]:
    """Six files of four images: ``0.png`` and its byte copy, ``1.png`` and a BMP of its pixels, ``2``, ``3``;
    their names and which image each holds."""
    folder = tmp_path_factory.mktemp("pool")
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    (folder / "copy.png").write_bytes((folder / "0.png").read_bytes())
    Image.open(folder / "1.png").save(folder / "1.bmp")
    return folder, ["0.png", "1.png", "2.png", "3.png", "copy.png", "1.bmp"], [0, 1, 2, 3, 0, 1]


ROWS = st.lists(
    st.tuples(st.integers(0, 5), st.sampled_from("ab"), st.sampled_from(["train", "val", "test"])),
    min_size=1,
    max_size=8,
)


@_settings(15)
@given(rows=ROWS)
def test_copies_are_refused_or_the_first_is_kept(pool, rows):
    folder, names, image_of = pool
    manifest = folder / "m.csv"
    manifest.write_text("\n".join(["path,label,split", *[f"{names[f]},{lbl},{s}" for f, lbl, s in rows]]))
    files = [file for file, _, _ in rows]
    images = [image_of[file] for file in files]
    first_rows = [images.index(image) for image in dict.fromkeys(images)]
    if len(first_rows) < len(rows):  # the same file is found before any image is read, then content
        same_file = next((i for i in range(len(rows)) if files[i] in files[:i]), None)
        later = (
            same_file if same_file is not None else next(i for i in range(len(rows)) if i not in first_rows)
        )
        first = files.index(files[later]) if same_file is not None else images.index(images[later])
        with pytest.raises(DataError) as error:
            read_manifest(manifest, image_size=8, duplicates="error")
        message = str(error.value)
        assert "\n" not in message
        assert message.startswith(f"{manifest}:{first + 2} ({names[files[first]]}) and ")
        assert f" and {manifest}:{later + 2} ({names[files[later]]}): " in message
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = read_manifest(manifest, image_size=8, duplicates="keep_first")
    dropped = [str(w.message) for w in caught if "copies dropped" in str(w.message)]
    assert dropped == (
        [
            f"{manifest.resolve()}: {len(rows) - len(first_rows)} copies dropped, the first of "
            "each image kept (data.duplicates: keep_first)"
        ]
        if len(first_rows) < len(rows)
        else []
    )
    kept = {split: dataset.splits[split] for split in dataset.splits}
    assert sum(len(split) for split in kept.values()) == len(first_rows)
    pixels = [image.tobytes() for split in kept.values() for image in split.images]
    assert len(set(pixels)) == len(pixels)  # no two copies left, in one split or across two
    expected = sorted((rows[i][2], rows[i][1]) for i in first_rows)
    found = sorted((s, dataset.class_names[y]) for s, split in kept.items() for y in split.labels)
    assert found == expected


def _valid_files() -> dict[str, bytes]:
    """One small valid file per reader suffix."""
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
    files = {}
    for suffix, fmt in ((".png", "PNG"), (".jpg", "JPEG"), (".bmp", "BMP"), (".tif", "TIFF")):
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, fmt)
        files[suffix] = buffer.getvalue()
    with tempfile.TemporaryDirectory() as folder:
        for suffix in (".nii", ".nii.gz"):
            path = Path(folder) / f"v{suffix}"
            nib.save(nib.Nifti1Image(rng.random((12, 12, 3)).astype(np.float32), np.eye(4)), path)
            files[suffix] = path.read_bytes()
    return files


VALID = _valid_files()
PREFIXES = [b""] + [bytes(offset) + magic for offset, magic, _ in MAGIC_NUMBERS]


def _read_or_refuse(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path``, read it: a correct image or a one-line DataError naming the file."""
    path.write_bytes(data)
    try:
        image = read_image(path, 8)
    except DataError as error:
        message = str(error)
        assert "\n" not in message and message.startswith(f"{path}: "), message
        assert "suitable reader" not in message
    else:
        assert image.shape[:2] == (8, 8) and image.shape[2] in (1, 3) and image.dtype == np.uint8


@_settings(60)
@given(
    suffix=st.sampled_from(sorted(READER_BY_SUFFIX)),
    prefix=st.sampled_from(PREFIXES),
    body=st.binary(max_size=400),
)
def test_any_bytes_under_an_image_suffix_read_or_fail_in_one_line(tmp_path, suffix, prefix, body):
    _read_or_refuse(tmp_path / f"x{suffix}", prefix + body)


@_settings(40)
@given(data=st.data(), suffix=st.sampled_from(sorted(VALID)))
def test_a_valid_file_cut_anywhere_reads_or_fails_in_one_line(tmp_path, data, suffix):
    content = VALID[suffix]
    cut = data.draw(st.integers(0, len(content)))
    _read_or_refuse(tmp_path / f"cut{suffix}", content[:cut])
    if cut == len(content):
        assert read_image(tmp_path / f"cut{suffix}", 8).shape[:2] == (8, 8)


def test_pool_files_hold_the_images_they_claim(pool):
    folder, names, image_of = pool
    pixels = [np.asarray(Image.open(folder / name)).tobytes() for name in names]
    for (a, image_a), (b, image_b) in itertools.combinations(zip(pixels, image_of, strict=True), 2):
        assert (a == b) == (image_a == image_b)
