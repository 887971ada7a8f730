"""Reading single images (PNG, JPEG, BMP, TIFF, DICOM, NIfTI): from a file, from a file's encoded bytes,
or from an array of pixels. All three end in the same intensity handling and resizing, so one image
gives the same uint8 pixels whichever way it arrives. DICOM and NIfTI go through MONAI's readers;
PNG, JPEG, BMP and TIFF through Pillow directly, with the pixels MONAI's ``PILReader`` would give."""

from __future__ import annotations

import hashlib
import io
import re
import tempfile
import warnings
import zlib
from collections.abc import Callable
from functools import cache, partial
from pathlib import Path

import numpy as np
import torch

from fewshot_med.data.intensity import IntensityConfig, to_byte_range
from fewshot_med.errors import DataError

#: File suffix -> the reader that opens it (``pil``: Pillow; ``dicom``, ``nifti``: MONAI's).
READER_BY_SUFFIX: dict[str, str] = {
    ".png": "pil",
    ".jpg": "pil",
    ".jpeg": "pil",
    ".bmp": "pil",
    ".tif": "pil",
    ".tiff": "pil",
    ".dcm": "dicom",
    ".dicom": "dicom",
    ".nii": "nifti",
    ".nii.gz": "nifti",
}

#: (offset, magic number, suffix) of the formats ``sniff_format`` recognises; BMP's two-byte magic last.
MAGIC_NUMBERS: tuple[tuple[int, bytes, str], ...] = (
    (0, b"\x89PNG\r\n\x1a\n", ".png"),
    (0, b"\xff\xd8\xff", ".jpg"),
    (0, b"II*\x00", ".tif"),
    (0, b"MM\x00*", ".tif"),
    (128, b"DICM", ".dcm"),
    (344, b"n+1\x00", ".nii"),  # NIfTI-1 single file
    (4, b"n+2\x00", ".nii"),  # NIfTI-2 single file
    (0, b"BM", ".bmp"),
)
GZIP_MAGIC = b"\x1f\x8b"
#: Suffix (a ``MAGIC_NUMBERS`` result) -> the format's name in error messages.
FORMAT_NAMES: dict[str, str] = {
    ".png": "PNG", ".jpg": "JPEG", ".tif": "TIFF", ".bmp": "BMP", ".dcm": "DICOM", ".nii": "NIfTI",
    ".nii.gz": "gzipped NIfTI",
}  # fmt: skip
#: Words of a reader's message that mean the file is valid but in a variant it does not decode.
UNSUPPORTED_WORDS = ("not supported", "unsupported", "not available", "no pixel data handler", "plugin")
NOT_AN_IMAGE = "not a PNG, JPEG, DICOM or NIfTI image"


def image_suffix(path: Path) -> str:
    """Return the suffix that selects a reader (``.nii.gz`` counts as one suffix)."""
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def is_image_file(path: Path) -> bool:
    """Whether ``path`` has a suffix this toolkit can read."""
    return path.is_file() and image_suffix(path) in READER_BY_SUFFIX


@cache
def _loader(kind: str, channels_last: bool = False) -> Callable[[str], torch.Tensor]:
    """Build (once) the MONAI ``LoadImage`` for a reader kind; MONAI is imported lazily. Pixels keep
    their stored dtype (after DICOM rescale slope and intercept), so 8-bit files can be told apart.
    ``channels_last`` tells ``PydicomReader`` that the last axis holds colour samples, which it cannot
    tell from a 3-slice volume itself."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*nvImageCodec.*")
        from monai.data import NibabelReader, PydicomReader
        from monai.transforms import LoadImage

    readers = {
        "dicom": lambda: PydicomReader(swap_ij=False, channel_dim=-1 if channels_last else None),
        "nifti": lambda: NibabelReader(),
    }
    reader = readers[kind]()
    # the reader passed at call time is the only one tried: no fallback to MONAI's defaults (a DICOM
    # named .png would otherwise be read by a PydicomReader that transposes it)
    return partial(
        LoadImage(reader=reader, image_only=True, ensure_channel_first=True, dtype=None), reader=reader
    )


def _is_colour_dicom(path: Path) -> bool:
    """Whether a DICOM file's pixels carry several samples (RGB, YBR), read from its header only."""
    import pydicom

    header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SamplesPerPixel"])
    return int(header.get("SamplesPerPixel", 1)) > 1


def read_image(
    path: Path,
    image_size: int,
    nifti_slice: int | None = None,
    intensity: IntensityConfig | None = None,
    *,
    volume_index: int | None = None,
) -> np.ndarray:
    """Read one 2D image (or one slice of a 3D volume), resized to a square.

    Args:
        path: the file; its suffix picks the reader (see ``READER_BY_SUFFIX``).
        image_size: output height and width; the whole image is resized, not cropped.
        nifti_slice: index along the last axis of a 3D volume; ``None`` takes the middle slice.
        intensity: how pixel values become 0..255 (``to_byte_range``); ``None`` is mode ``auto``.
        volume_index: which volume of a 4D NIfTI file (``data.volume_index``); such a file without it is
            refused, as its volumes would otherwise pass for colour channels. Single-volume files ignore it.

    Returns:
        ``(image_size, image_size, C)`` uint8 array with ``C`` 1 (grey) or 3 (RGB; alpha dropped).

    Raises:
        DataError: one line naming the file and the cause (empty, not an image, wrong suffix,
            truncated, too large, unsupported variant).
    """
    return read_image_and_digest(path, image_size, nifti_slice, intensity, volume_index=volume_index)[0]


def read_image_and_digest(
    path: Path,
    image_size: int,
    nifti_slice: int | None = None,
    intensity: IntensityConfig | None = None,
    *,
    volume_index: int | None = None,
) -> tuple[np.ndarray, str]:
    """``read_image``, and the SHA-256 of the chosen 2D plane's pixels as stored (dtype and shape
    included; before intensity handling and resizing), so copies are found by content whatever their
    file bytes (a DICOM exported twice differs in its UIDs), at the cost of hashing the decoded array."""
    kind = READER_BY_SUFFIX.get(image_suffix(path))
    if kind is None:
        raise DataError(f"{path}: unsupported file type; use one of {sorted(READER_BY_SUFFIX)}")
    try:
        image = _load(path, kind)
    except Exception as error:  # MONAI wraps every reader failure differently
        raise DataError(_diagnose(path, kind, error)) from None
    plane = _plane(image, kind, str(path), nifti_slice, volume_index)
    digest = hashlib.sha256(f"{plane.dtype}{tuple(plane.shape)}".encode())
    digest.update(np.ascontiguousarray(plane.numpy()).data)
    image = _square_bytes(plane.float(), str(path), image_size, intensity, _is_photo(plane, kind))
    return image, digest.hexdigest()


def decode_image(
    data: bytes,
    image_size: int,
    nifti_slice: int | None = None,
    intensity: IntensityConfig | None = None,
    name: str = "bytes",
    *,
    volume_index: int | None = None,
) -> np.ndarray:
    """Read an image from a file's encoded bytes, as ``read_image`` reads the file.

    The format comes from the bytes' magic number (``sniff_format``), not from a file name; the bytes
    are written to a temporary file with the matching suffix and read by the same reader.

    Args:
        data: the whole file: PNG, JPEG, BMP, TIFF, DICOM (with or without the 128-byte preamble) or
            NIfTI (plain or gzipped).
        image_size: output height and width; the whole image is resized, not cropped.
        nifti_slice: index along the last axis of a 3D volume; ``None`` takes the middle slice.
        intensity: how pixel values become 0..255; ``None`` is mode ``auto``.
        name: what error messages call the input, e.g. the upload's file name or ``"bytes #3"``.
        volume_index: which volume of a 4D NIfTI file (required for one).

    Returns:
        ``(image_size, image_size, C)`` uint8 array with ``C`` 1 or 3.
    """
    suffix = sniff_format(data)
    if suffix is None:
        raise DataError(f"{name}: {NOT_AN_IMAGE} ({_describe(data)}); send the image file itself")

    def unreadable(reason: str) -> str:
        return f"{name}: {NOT_AN_IMAGE} (truncated or corrupt {suffix} file: {reason}); send the whole file"

    kind = READER_BY_SUFFIX[suffix]
    if kind == "dicom" and data[128:132] != b"DICM":
        data = _with_file_meta(data, unreadable)
    with tempfile.TemporaryDirectory(prefix="fewshot-med-decode-") as folder:
        path = Path(folder) / f"image{suffix}"
        path.write_bytes(data)
        try:
            image = _load(path, kind)
        except Exception as error:  # MONAI wraps every reader failure differently
            raise DataError(unreadable(_first_line(error).replace(str(path), name))) from None
    plane = _plane(image, kind, name, nifti_slice, volume_index)
    return _square_bytes(plane.float(), name, image_size, intensity, _is_photo(plane, kind))


def prepare_array(
    array: np.ndarray, image_size: int, intensity: IntensityConfig | None = None, name: str = "array"
) -> np.ndarray:
    """Turn an array of pixels into the uint8 square image ``read_image`` makes of a file.

    uint8 arrays are 8-bit photographs (they pass through under ``auto``); any other dtype (uint16,
    int16, float) follows the intensity mode, e.g. per-image percentiles under ``auto``.

    Args:
        array: ``(H, W)``, ``(H, W, 1)``, ``(H, W, 3)`` or ``(H, W, 4)`` (alpha dropped), any real dtype.
        image_size: output height and width; the whole image is resized (antialiased bilinear).
        intensity: how pixel values become 0..255; ``None`` is mode ``auto``.
        name: what error messages call the input.

    Returns:
        ``(image_size, image_size, C)`` uint8 array with ``C`` 1 or 3.
    """
    array = np.asarray(array)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4) or 0 in array.shape:
        raise DataError(
            f"{name}: array of shape {array.shape}; give (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) pixels"
        )
    if array.dtype.kind not in "biuf":
        raise DataError(f"{name}: array of dtype {array.dtype}; give integer or float pixel values")
    tensor = torch.from_numpy(np.ascontiguousarray(array[..., :3], dtype=np.float32)).permute(2, 0, 1)
    return _square_bytes(tensor, name, image_size, intensity, photo=array.dtype == np.uint8)


def sniff_format(data: bytes) -> str | None:
    """The file suffix (a key of ``READER_BY_SUFFIX``) that the bytes' magic number names, or ``None``.

    Recognises PNG, JPEG, TIFF, BMP, DICOM (``DICM`` at offset 128, or a bare dataset without preamble
    and file meta that pydicom reads and that holds pixel data) and NIfTI-1/2, plain or gzipped.
    """
    if data[:2] == GZIP_MAGIC:
        try:  # only the header: 352 bytes hold the NIfTI-1 magic
            head = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS).decompress(data, 352)
        except zlib.error:
            return None
        return ".nii.gz" if _magic_suffix(head) == ".nii" else None
    return _magic_suffix(data) or (".dcm" if _is_bare_dicom(data) else None)


def _magic_suffix(data: bytes) -> str | None:
    """The suffix of the first magic number in ``MAGIC_NUMBERS`` that ``data`` carries."""
    found = (suffix for offset, magic, suffix in MAGIC_NUMBERS if data.startswith(magic, offset))
    return next(found, None)


def _is_bare_dicom(data: bytes) -> bool:
    """Whether pydicom reads ``data`` as a DICOM dataset (no preamble needed) holding pixel data."""
    import pydicom

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return "PixelData" in pydicom.dcmread(io.BytesIO(data), force=True)
    except Exception:  # pydicom raises many types on bytes that are not DICOM
        return False


def _with_file_meta(data: bytes, unreadable: Callable[[str], str]) -> bytes:
    """A bare DICOM dataset (no preamble, no file meta, as sent over the network) as a DICOM file;
    pydicom (>= 3) writes the file meta from the dataset and the transfer syntax it was read with."""
    import pydicom

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dataset = pydicom.dcmread(io.BytesIO(data), force=True)
            buffer = io.BytesIO()
            dataset.save_as(buffer, enforce_file_format=True)
    except Exception as error:  # missing SOP UIDs, inconsistent elements
        raise DataError(unreadable(_first_line(error))) from None
    return buffer.getvalue()


def _describe(data: bytes) -> str:
    """What unrecognised bytes look like, without echoing their content."""
    if not data:
        return "empty"
    if data[:2] == GZIP_MAGIC:
        return f"{len(data)} bytes of gzip data that is not a NIfTI volume"
    return f"{len(data)} bytes with an unknown header"


def _first_line(error: Exception) -> str:
    """An exception's first message line, or its type when it has no message."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _load(path: Path, kind: str) -> torch.Tensor:
    """``(C, H, W)`` or ``(C, H, W, D)`` pixels of a file in their stored dtype; a NIfTI file's volumes
    (its 4th axis) come first, as channels. Raises whatever the reader raises."""
    if kind == "pil":
        return _read_pil(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        colour = kind == "dicom" and _is_colour_dicom(path)
        return _loader(kind, colour)(str(path)).as_tensor()


def _read_pil(path: Path) -> torch.Tensor:
    """``(C, H, W)`` pixels of a PNG, JPEG, BMP or TIFF file as MONAI's ``LoadImage`` with a
    ``PILReader(reverse_indexing=False)`` gives them (palette indices, 1-bit as bool; 16-bit as int32,
    MONAI's ``convert_to_tensor``), read by Pillow without MONAI's per-file metadata: several times
    faster on small images, whose reading is mostly that overhead."""
    from monai.utils import convert_to_tensor
    from PIL import Image

    with Image.open(path) as image:
        pixels = np.array(image)  # writable: torch warns on read-only arrays
    pixels = pixels.astype(pixels.dtype.newbyteorder("="), copy=False)  # 16-bit big-endian TIFF
    tensor = convert_to_tensor(pixels, track_meta=False)
    return tensor.unsqueeze(0) if tensor.ndim == 2 else tensor.permute(2, 0, 1)


def _diagnose(path: Path, kind: str, error: Exception) -> str:
    """The one-line error for a file its reader failed on, from what the bytes are: empty, not an
    image, another format than the suffix says, too large, truncated, an unsupported variant, corrupt."""
    try:
        data = path.read_bytes()
    except OSError as failure:
        return f"{path}: cannot open the file ({failure.strerror or type(failure).__name__}); check the path"
    found = sniff_format(data) if data else None
    advice = "replace or remove the file"
    if not data:
        cause = "empty file, 0 bytes"
    elif found is None:
        cause = f"not an image: {_describe(data)}"
    elif READER_BY_SUFFIX[found] != kind:
        cause = f"wrong extension: the content is {FORMAT_NAMES[found]}"
        advice = f"rename the file to {found}"
    else:
        reason = _pil_failure(data) if kind == "pil" else None
        cause = _cause(reason or _first_line(error).replace(str(path), "<file>"), FORMAT_NAMES[found])
    return f"{path}: cannot read this {kind} image ({cause}); {advice}"


def _cause(reason: str, format_name: str) -> str:
    """A reader's failure message, prefixed with what it means: too large, truncated, unsupported, corrupt."""
    lowered = reason.lower()
    if reason.startswith("too large"):
        return reason
    if "truncat" in lowered or "ended before" in lowered or "end of file" in lowered:
        return f"truncated {format_name} file: {reason}"
    if any(word in lowered for word in UNSUPPORTED_WORDS):
        return f"unsupported {format_name} variant: {reason}"
    return f"corrupt {format_name} file: {reason}"


def _pil_failure(data: bytes) -> str | None:
    """Why Pillow cannot decode ``data`` (``None`` if it can): its size limit against decompression bombs
    (``PIL.Image.MAX_IMAGE_PIXELS``) named as such, other errors by their first line."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as image:
                image.load()
    except Image.DecompressionBombError as error:
        sizes = re.findall(r"\d+", str(error))
        detail = f"{sizes[0]} pixels, over" if len(sizes) >= 2 else "over"
        return f"too large: {detail} Pillow's limit of {2 * Image.MAX_IMAGE_PIXELS} pixels (MAX_IMAGE_PIXELS)"
    except UnidentifiedImageError:
        return "Pillow cannot identify its content"
    except Exception as error:  # Pillow raises OSError, SyntaxError, ValueError on broken files
        return _first_line(error)
    return None


def _plane(
    image: torch.Tensor, kind: str, label: str, nifti_slice: int | None, volume_index: int | None
) -> torch.Tensor:
    """A loaded file's ``(C, H, W)`` pixels in their stored dtype: the chosen volume of a 4D NIfTI file,
    one slice of a 3D volume, alpha dropped."""
    if kind == "nifti":
        image = _volume(image, label, volume_index)
    if image.ndim == 4:  # (C, H, W, D) volume: take one slice
        depth = image.shape[-1]
        index = depth // 2 if nifti_slice is None else nifti_slice
        if not -depth <= index < depth:
            raise DataError(f"{label}: slice {index} is outside the volume's {depth} slices; set nifti_slice")
        image = image[..., index]
    if image.ndim != 3:
        raise DataError(f"{label}: image has shape {tuple(image.shape)}; expected a 2D image or 3D volume")
    if image.shape[0] == 4:
        image = image[:3]
    if image.shape[0] not in (1, 3):
        raise DataError(f"{label}: image has {image.shape[0]} channels; expected 1 (grey) or 3 (RGB)")
    return image


def _volume(image: torch.Tensor, label: str, volume_index: int | None) -> torch.Tensor:
    """One volume of a NIfTI file's ``(V, H, W[, D])`` pixels: ``volume_index`` is required when
    ``V > 1`` and ignored when ``V == 1`` (3D files in a dataset that also holds 4D ones)."""
    volumes = image.shape[0]
    if volumes == 1:
        return image
    if volume_index is None:
        raise DataError(
            f"{label}: 4D NIfTI file with {volumes} volumes; choose one with data.volume_index "
            f"(0 to {volumes - 1})"
        )
    if not -volumes <= volume_index < volumes:
        raise DataError(
            f"{label}: volume_index {volume_index} is outside the file's {volumes} volumes; "
            f"set data.volume_index from 0 to {volumes - 1}"
        )
    return image[[volume_index]]


def _is_photo(plane: torch.Tensor, kind: str) -> bool:
    """Photographs for ``auto``: PIL-read files and 8-bit DICOM (secondary captures, VL photographic
    images); NIfTI volumes never are."""
    return kind == "pil" or (kind == "dicom" and plane.dtype == torch.uint8)


def _square_bytes(
    image: torch.Tensor, label: str, image_size: int, intensity: IntensityConfig | None, photo: bool
) -> np.ndarray:
    """``(C, H, W)`` float32 pixels -> ``(S, S, C)`` uint8: intensity mode, then the whole image resized
    (bilinear, antialiased), rounded and clipped."""
    if not torch.isfinite(image).all():
        raise DataError(f"{label}: image holds NaN or infinite values; fix or remove it")
    image = to_byte_range(image, intensity or IntensityConfig(), photo)
    if tuple(image.shape[1:]) != (image_size, image_size):
        image = torch.nn.functional.interpolate(
            image[None], size=(image_size, image_size), mode="bilinear", antialias=True
        )[0]
    return image.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
