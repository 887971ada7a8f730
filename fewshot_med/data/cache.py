"""Data larger than memory: local images decoded once, in parallel, into an on-disk cache of uint8 arrays
that the rest of the toolkit reads as read-only ``numpy.memmap`` arrays.

``decode_to_cache`` reads every file through PyTorch DataLoader workers (``read_image_and_digest`` in
each worker) and writes the resized uint8 pixels to ``<cache_dir>/<key>/images.npy``. The key is a
SHA-256 of everything that changes the decoded pixels: each file's resolved path, size and modification
time, the image size, the NIfTI slice and volume, the intensity settings, and ``CACHE_FORMAT``. A file
that changes gets a new key, so a stale entry is never read. Entries appear atomically (written to a
temporary folder, then renamed), so a killed run leaves no half-written entry behind.

``take_rows`` selects rows of a cached array (a split, the base classes of a split) as another cached
array, so selecting never copies a whole split into memory. The cache holds decoded patient images:
keep ``data.cache_dir`` on storage cleared for them, never inside ``mlruns``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader, Dataset

from fewshot_med.data.intensity import IntensityConfig
from fewshot_med.data.readers import read_image_and_digest
from fewshot_med.errors import DataError

#: Bump when the decoded pixels or the cache layout change, so older entries are not read.
CACHE_FORMAT = "1"
#: ``data.stream: auto`` streams a folder or manifest when its decoded images would exceed this.
STREAM_AUTO_BYTES = 1 << 30
#: Rows copied per step when selecting rows of a cached array or hashing one (bounds memory use).
CHUNK_BYTES = 64 << 20
IMAGES_FILE = "images.npy"
DIGESTS_FILE = "digests.npy"
DERIVED_FOLDER = "rows"


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/fewshot-med/decoded``, else ``~/.cache/fewshot-med/decoded``."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "fewshot-med" / "decoded"


@dataclass(frozen=True)
class StreamOptions:
    """Whether and where local images are decoded into the cache.

    Attributes:
        stream: ``True``, ``False``, or ``"auto"`` (``data.stream``): stream when the decoded images would
            take more than ``STREAM_AUTO_BYTES``.
        cache_dir: the cache's folder (``data.cache_dir``); ``default_cache_dir()`` when ``None``.
        workers: DataLoader processes that decode (``data.decode_workers``); all CPUs up to 8 when
            ``None``, 0 decodes in this process.
    """

    stream: bool | str = "auto"
    cache_dir: str | None = None
    workers: int | None = None

    def applies(self, n_images: int, image_size: int) -> bool:
        """Whether ``n_images`` images of ``image_size`` pixels square go through the cache."""
        if self.stream == "auto":
            return n_images * image_size * image_size * 3 > STREAM_AUTO_BYTES
        return bool(self.stream)


def cache_key(
    paths: Sequence[Path],
    image_size: int,
    nifti_slice: int | None,
    intensity: IntensityConfig | None,
    volume_index: int | None,
) -> str:
    """SHA-256 (hex) of the files' identities (resolved path, size, mtime in ns) and the read options."""
    sha = hashlib.sha256()
    options = (
        CACHE_FORMAT,
        image_size,
        nifti_slice,
        volume_index,
        (intensity or IntensityConfig()).model_dump_json(),
    )
    sha.update(repr(options).encode())
    for path in paths:
        stat = path.stat()
        sha.update(f"\x1f{path.resolve()}\x1e{stat.st_size}\x1e{stat.st_mtime_ns}".encode())
    return sha.hexdigest()


class _DecodeFiles(Dataset):
    """Item ``i``: ``(i, (S, S, C) uint8 image or None, pixel digest or the DataError's one line)``."""

    def __init__(self, paths: Sequence[Path], options: dict) -> None:
        self.paths = [str(path) for path in paths]
        self.options = options

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, np.ndarray | None, str]:
        try:  # the one-line message crosses the process boundary as a value, not a wrapped traceback
            image, digest = read_image_and_digest(Path(self.paths[index]), **self.options)
        except DataError as error:
            return index, None, str(error)
        return index, image, digest


def _as_list(batch: list) -> list:
    """Collate nothing: images may differ in channels until all are read."""
    return batch


def decode_to_cache(
    paths: Sequence[Path],
    image_size: int,
    nifti_slice: int | None,
    intensity: IntensityConfig | None,
    volume_index: int | None,
    streaming: StreamOptions,
) -> tuple[np.ndarray, list[str]]:
    """Decode ``paths`` once into the cache (or find them there) and map the result.

    Args:
        paths: the image files, in the order of the result's rows.
        image_size, nifti_slice, intensity, volume_index: as for ``read_image``.
        streaming: the cache's folder and the number of decoding workers.

    Returns:
        ``(N, S, S, C)`` read-only uint8 memmap (grey images become RGB if any is RGB, as in memory), and
        the SHA-256 of each file's decoded pixels (``read_image_and_digest``).

    Raises:
        DataError: the first unreadable file's one-line error, naming the file.
    """
    root = Path(streaming.cache_dir).expanduser() if streaming.cache_dir else default_cache_dir()
    entry = root / cache_key(paths, image_size, nifti_slice, intensity, volume_index)
    if not (entry / DIGESTS_FILE).is_file():
        root.mkdir(parents=True, exist_ok=True)
        options = dict(image_size=image_size, nifti_slice=nifti_slice, intensity=intensity)
        _decode(paths, options | {"volume_index": volume_index}, entry, streaming.workers)
    images = np.load(entry / IMAGES_FILE, mmap_mode="c")
    return images, [digest.decode() for digest in np.load(entry / DIGESTS_FILE)]


def _decode(paths: Sequence[Path], options: dict, entry: Path, workers: int | None) -> None:
    """Write ``entry/images.npy`` and ``entry/digests.npy`` through a temporary folder renamed at the end."""
    size = options["image_size"]
    workers = min(8, os.cpu_count() or 1) if workers is None else workers
    loader = DataLoader(_DecodeFiles(paths, options), batch_size=64, num_workers=workers, collate_fn=_as_list)
    staging = Path(tempfile.mkdtemp(prefix=f"{entry.name}.", dir=entry.parent))
    try:
        rgb = np.lib.format.open_memmap(
            staging / "rgb.npy", mode="w+", dtype=np.uint8, shape=(len(paths), size, size, 3)
        )
        digests = np.empty(len(paths), dtype="S64")
        any_colour = False
        for batch in loader:
            for index, image, digest in batch:
                if image is None:
                    raise DataError(digest)
                any_colour |= image.shape[-1] == 3
                rgb[index] = image  # grey broadcasts to all three channels
                digests[index] = digest
        rgb.flush()
        if any_colour:
            os.replace(staging / "rgb.npy", staging / IMAGES_FILE)
        else:
            grey = np.lib.format.open_memmap(
                staging / IMAGES_FILE, mode="w+", dtype=np.uint8, shape=(len(paths), size, size, 1)
            )
            for start, stop in _chunks(rgb):
                grey[start:stop] = rgb[start:stop, ..., :1]
            grey.flush()
            del grey
            (staging / "rgb.npy").unlink()
        del rgb
        np.save(staging / DIGESTS_FILE, digests)
        try:
            staging.rename(entry)
        except OSError:  # another process published the same entry first: keep theirs
            if not (entry / DIGESTS_FILE).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _chunks(images: np.ndarray) -> list[tuple[int, int]]:
    """``(start, stop)`` row ranges of about ``CHUNK_BYTES`` each."""
    per_row = max(1, int(np.prod(images.shape[1:])) * images.itemsize)
    step = max(1, CHUNK_BYTES // per_row)
    return [(start, min(start + step, len(images))) for start in range(0, len(images), step)]


def iter_row_chunks(images: np.ndarray) -> list[np.ndarray]:
    """``images`` cut along its first axis into C-contiguous pieces of about ``CHUNK_BYTES`` (views of a
    contiguous array, copies of one chunk at a time otherwise), for hashing without a whole copy."""
    return [np.ascontiguousarray(images[start:stop]) for start, stop in _chunks(images)]


def take_rows(images: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``images[rows]`` for ``(N, ...)`` images and ``(M,)`` int row indices, without holding the
    selection in memory when ``images`` is a cached memmap: a contiguous run of rows is a view, other
    selections are written (chunk by chunk) beside the source file, keyed by the source and the rows,
    and mapped. In-memory arrays are indexed as usual."""
    rows = np.asarray(rows, dtype=np.int64)
    if not isinstance(images, np.memmap) or images.filename is None:
        return images[rows]
    if len(rows) and np.array_equal(rows, np.arange(rows[0], rows[0] + len(rows))):
        return images[rows[0] : rows[0] + len(rows)]
    source = Path(images.filename)
    folder = source.parent / DERIVED_FOLDER
    sha = hashlib.sha256(f"{source.name}{_byte_offset(images)}{images.shape}{images.strides}".encode())
    sha.update(rows.tobytes())
    target = folder / f"{sha.hexdigest()}.npy"
    if not target.is_file():
        folder.mkdir(exist_ok=True)
        handle, staging = tempfile.mkstemp(suffix=".npy", dir=folder)
        os.close(handle)
        try:
            out = np.lib.format.open_memmap(
                staging, mode="w+", dtype=images.dtype, shape=(len(rows), *images.shape[1:])
            )
            for start, stop in _chunks(out):
                out[start:stop] = images[rows[start:stop]]
            out.flush()
            del out
            os.replace(staging, target)
        finally:
            Path(staging).unlink(missing_ok=True)
    return np.load(target, mmap_mode="c")


def _byte_offset(images: np.memmap) -> int:
    """Where a memmap (or a view of one) starts in its file, so views of one file get distinct keys."""
    root = images
    while isinstance(root.base, np.ndarray):
        root = root.base
    return int(root.offset) + images.ctypes.data - root.ctypes.data
