"""File checks: empty, not an image, wrong extension, truncated, unreadable, extreme sizes.

Headers come first and cost little: Pillow's ``Image.open`` reads a file's magic bytes and header
without decoding pixels, pydicom reads a DICOM header with ``stop_before_pixels``, nibabel a NIfTI
header. Only files whose header passes are decoded, with the toolkit's own ``read_image``, so an image
the audit calls readable is one training can read.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from fewshot_med.audit.findings import ERROR, WARNING, Finding
from fewshot_med.audit.inventory import Item
from fewshot_med.data.readers import READER_BY_SUFFIX, image_suffix, read_image
from fewshot_med.errors import DataError


@dataclass(frozen=True)
class FileLimits:
    """Sizes worth a warning (pixels of the stored image, before resizing)."""

    min_side: int = 32
    max_side: int = 10_000
    max_aspect: float = 4.0


@dataclass(frozen=True)
class Header:
    """What a file's header says: its format (a ``READER_BY_SUFFIX`` reader kind plus Pillow's format
    name for photographs) and its size in pixels."""

    kind: str
    format: str
    width: int
    height: int


@dataclass(frozen=True)
class FileScan:
    """The outcome of scanning the files of an inventory.

    Attributes:
        findings: one or more per problem file.
        images: ``(N, S, S, C)`` uint8, the readable files' pixels at the audit size (zeros elsewhere).
        readable: ``(N,)`` bool, whether each file decoded.
        byte_digests: SHA-256 of each readable file's bytes (``""`` elsewhere).
    """

    findings: list[Finding]
    images: np.ndarray
    readable: np.ndarray
    byte_digests: list[str]


def _pil_header(path: Path) -> Header:
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow's DecompressionBombWarning: the size check reports it
        with Image.open(path) as image:
            return Header("pil", str(image.format), *image.size)


def _dicom_header(path: Path) -> Header:
    import pydicom

    dataset = pydicom.dcmread(path, stop_before_pixels=True)
    return Header("dicom", "DICOM", int(dataset.Columns), int(dataset.Rows))


def _nifti_header(path: Path) -> Header:
    import nibabel

    shape = nibabel.load(path).shape
    return Header("nifti", "NIfTI", int(shape[0]), int(shape[1]))


#: Reader kind -> header reader; each raises on a file whose magic bytes are not its format.
HEADER_READERS: dict[str, Callable[[Path], Header]] = {
    "pil": _pil_header,
    "dicom": _dicom_header,
    "nifti": _nifti_header,
}
#: Pillow format -> the suffixes that name it.
SUFFIXES_BY_FORMAT: dict[str, tuple[str, ...]] = {
    "PNG": (".png",),
    "JPEG": (".jpg", ".jpeg"),
    "BMP": (".bmp",),
    "TIFF": (".tif", ".tiff"),
}


def read_header(path: Path) -> Header | None:
    """The header of ``path``, read as its suffix says and, if that fails, as any other known format
    (so a PNG named ``.dcm`` is found); ``None`` when no reader recognises the content."""
    expected = READER_BY_SUFFIX[image_suffix(path)]
    for kind in (expected, *(k for k in HEADER_READERS if k != expected)):
        try:
            return HEADER_READERS[kind](path)
        except Exception:  # every library raises its own errors on foreign content
            continue
    return None


def _header_findings(item: Item, path: Path, header: Header | None, limits: FileLimits) -> list[Finding]:
    """Problems a header shows: not an image, a mismatched suffix, extreme sizes."""
    suffix = image_suffix(path)
    expected = READER_BY_SUFFIX[suffix]
    if header is None:
        return [
            Finding(
                item.name,
                "not_an_image",
                ERROR,
                f"no image reader recognises the content of this {suffix} file",
            )
        ]
    findings = []
    if header.kind != expected:
        findings.append(
            Finding(
                item.name,
                "wrong_extension",
                ERROR,
                f"content is {header.format} but the suffix is {suffix}; "
                f"the {expected} reader cannot read it",
            )
        )
    elif header.kind == "pil" and suffix not in SUFFIXES_BY_FORMAT.get(header.format, (suffix,)):
        findings.append(
            Finding(
                item.name,
                "wrong_extension",
                WARNING,
                f"content is {header.format} but the suffix is {suffix}; it reads, but other tools may not",
            )
        )
    short, long = sorted((header.width, header.height))
    size = f"{header.width}x{header.height} px"
    if short < limits.min_side:
        findings.append(Finding(item.name, "tiny_image", WARNING, f"{size}; minimum side {limits.min_side}"))
    if long > limits.max_side:
        findings.append(Finding(item.name, "huge_image", WARNING, f"{size}; maximum side {limits.max_side}"))
    if short > 0 and long / short > limits.max_aspect:
        findings.append(
            Finding(
                item.name,
                "extreme_aspect",
                WARNING,
                f"{size}, aspect {long / short:.1f}; maximum {limits.max_aspect:g}",
            )
        )
    return findings


def _decode_failure(item: Item, path: Path, error: DataError) -> Finding:
    """``truncated`` when the reader says the data ends early, else ``unreadable``; the reason without
    the path or file name."""
    reason = str(error).replace(str(path), "<file>").replace(path.name, "<file>")
    check = "truncated" if "truncated" in reason.lower() else "unreadable"
    return Finding(item.name, check, ERROR, f"read_image fails: {reason.removeprefix('<file>: ')}")


def scan_files(items: Sequence[Item], image_size: int, limits: FileLimits = FileLimits()) -> FileScan:
    """Check every file: size 0, header (magic bytes vs suffix, dimensions), then decode with ``read_image``.

    Args:
        items: the files (``item.path`` set).
        image_size: side the readable images are decoded to (``read_image``).
        limits: the sizes that are flagged.

    Returns:
        The findings, and the pixels and byte digests of the readable files; grey images become RGB
        when any image is RGB, as ``fewshot_med.data.local`` reads them.
    """
    findings: list[Finding] = []
    decoded: list[np.ndarray | None] = []
    digests: list[str] = []
    for item in tqdm(items, desc="checking files", unit="file", leave=False, disable=len(items) < 200):
        path = item.path
        assert path is not None, "scan_files takes file items"
        data = path.read_bytes()
        image, digest = None, ""
        if not data:
            findings.append(Finding(item.name, "empty_file", ERROR, "0 bytes"))
        else:
            header = read_header(path)
            problems = _header_findings(item, path, header, limits)
            findings += problems
            if not any(p.severity == ERROR for p in problems):
                try:
                    image, digest = read_image(path, image_size), hashlib.sha256(data).hexdigest()
                except DataError as error:
                    findings.append(_decode_failure(item, path, error))
        decoded.append(image)
        digests.append(digest)
    readable = np.asarray([image is not None for image in decoded], dtype=bool)
    channels = 3 if any(image is not None and image.shape[-1] == 3 for image in decoded) else 1
    images = np.zeros((len(items), image_size, image_size, channels), dtype=np.uint8)
    for index, image in enumerate(decoded):
        if image is not None:
            images[index] = image if image.shape[-1] == channels else np.repeat(image, channels, axis=-1)
    return FileScan(findings, images, readable, digests)
