"""A corpus of broken files, made here: each ends in a clean one-line ``DataError`` that names the file and
the cause, or in a correct image."""

import io
import struct
import warnings
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from fewshot_med.data import LoadOptions, load_dataset
from fewshot_med.data.readers import read_image
from fewshot_med.errors import DataError
from tests.data.test_local import write_dicom

RNG = np.random.default_rng(7)
PIXELS = RNG.integers(0, 256, (24, 24, 3), dtype=np.uint8)
SUFFIXES = (".png", ".jpg", ".dcm", ".nii", ".nii.gz")
UNKNOWN = "(not an image: 700 bytes with an unknown header)"


def declared_png(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width x height`` grey pixels and whose data holds almost none."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(bytes(10)))
        + chunk(b"IEND", b"")
    )


def _encoded(fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(PIXELS).save(buffer, fmt)
    return buffer.getvalue()


def _nifti(tmp_path: Path, shape: tuple[int, ...], name: str = "v.nii.gz") -> bytes:
    nib.save(nib.Nifti1Image(RNG.normal(0, 1, shape).astype(np.float32), np.eye(4)), tmp_path / name)
    return (tmp_path / name).read_bytes()


def _corpus(tmp_path: Path) -> list[tuple[str, bytes, str | None]]:
    """``(file name, content, what its error must say)``; ``None``: any clean error, or an image."""
    (tmp_path / "src").mkdir()
    png, jpeg = _encoded("PNG"), _encoded("JPEG")
    dicom = write_dicom(tmp_path / "src" / "x.dcm", RNG.integers(0, 4000, (24, 24))).read_bytes()
    nifti = _nifti(tmp_path / "src", (24, 24, 3))
    return [
        *((f"empty{s}", b"", "(empty file, 0 bytes)") for s in SUFFIXES),
        *((f"random{s}", RNG.bytes(700), UNKNOWN) for s in SUFFIXES),
        ("cut.png", png[: len(png) // 2], "truncated PNG file"),
        ("cut.jpg", jpeg[: len(jpeg) // 2], "truncated JPEG file"),
        ("cut.nii.gz", nifti[: len(nifti) // 2], "truncated gzipped NIfTI file"),
        ("cut.dcm", dicom[: len(dicom) // 2], None),
        ("header_only.png", png[:40], None),
        ("magic_then_noise.png", png[:8] + RNG.bytes(200), None),
        ("png_named.dcm", png, "(wrong extension: the content is PNG); rename the file to .png"),
        ("dicom_named.png", dicom, "(wrong extension: the content is DICOM); rename the file to .dcm"),
        ("nifti_named.jpg", nifti, "(wrong extension: the content is gzipped NIfTI)"),
        ("jpeg_named.png", jpeg, None),  # both Pillow's: reads
        ("huge.png", declared_png(30000, 30000), "(too large: 900000000 pixels, over Pillow's limit"),
        ("four_d.nii.gz", _nifti(tmp_path / "src", (24, 24, 3, 4), "4d.nii.gz"), "volume_index (0 to 3)"),
    ]


def test_every_corrupt_file_gives_one_line_naming_file_and_cause(tmp_path):
    results = {}
    for name, content, fragment in _corpus(tmp_path):
        path = tmp_path / name
        path.write_bytes(content)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                image = read_image(path, 16)
        except DataError as error:
            message = str(error)
            assert "\n" not in message and message.startswith(f"{path}: "), message
            assert "suitable reader" not in message and message.count(str(path)) == 1, message
            assert fragment is None or fragment in message, (name, message)
            results[name] = message
        else:
            assert fragment is None, (name, "read although broken")
            assert image.shape[:2] == (16, 16) and image.dtype == np.uint8
            results[name] = "read"
    assert results["jpeg_named.png"] == "read"
    assert len(results) == 22


def _rows(tmp_path: Path, count: int) -> list[str]:
    (tmp_path / "img").mkdir(exist_ok=True)
    for i in range(count):
        Image.fromarray(RNG.integers(0, 256, (12, 12), dtype=np.uint8)).save(tmp_path / "img" / f"{i}.png")
    return [f"img/{i}.png,{'xy'[i % 2]}" for i in range(count)]


@pytest.mark.parametrize(
    ("name", "content", "fragment"),
    [
        ("latin.csv", lambda rows: "path,label\nimg/0.png,névus\n".encode("latin-1"), "(byte 0xe9 at"),
        ("doubled.csv", lambda rows: "\n".join(["path,label", *rows, *rows]).encode(), "listed twice"),
        (
            "conflict.csv",
            lambda rows: "\n".join(["path,label", *rows, "img/0.png,y"]).encode(),
            "under two labels ('x' and 'y')",
        ),
        ("binary.csv", lambda rows: _encoded("PNG"), "not utf-8 text (byte 0x89 at offset 0)"),
        ("header.csv", lambda rows: b"path,label\n", "lists no images"),
        ("nul.csv", lambda rows: "\n".join(["path,label", "img/0.png,x\0y", *rows]).encode(), None),
    ],
)
def test_every_corrupt_manifest_gives_one_line_naming_it(tmp_path, name, content, fragment):
    path = tmp_path / name
    path.write_bytes(content(_rows(tmp_path, 8)))
    with pytest.raises(DataError) as error:
        load_dataset(str(path), LoadOptions(image_size=12))
    message = str(error.value)
    assert "\n" not in message and name in message
    assert fragment is None or fragment in message, message
