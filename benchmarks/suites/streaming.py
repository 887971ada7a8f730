"""Cached (memory-mapped) against in-memory pretraining throughput on the same images.

The base-class train and val images of a catalogue dataset are written as PNG files with a CSV manifest,
read back through the on-disk cache (``data.stream: true``: each split is a ``numpy.memmap`` of the
decoded images, ``fewshot_med.data.cache``) and copied into memory; the pixels are checked to be
identical. fewshot-med's pretraining loop then runs on each, in memory, cached, in memory, cached, so
drift shows; the ratio is cached / in memory images/s (target: at least 0.9).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.suites.throughput import backbone_spec, loop_settings, our_loop


def _write_manifest(folder: Path, subsets: dict[str, Any]) -> Path:
    """``folder/<split>/<row>.png`` for each subset's images and a manifest ``path,label,split``."""
    from PIL import Image

    rows = []
    for split, subset in subsets.items():
        (folder / split).mkdir(parents=True, exist_ok=True)
        for row, (image, label) in enumerate(zip(subset.images, subset.labels, strict=True)):
            Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(
                folder / split / f"{row}.png"
            )
            rows.append(f"{split}/{row}.png,{subset.class_names[label]},{split}")
    manifest = folder / "manifest.csv"
    manifest.write_text("path,label,split\n" + "\n".join(rows) + "\n")
    return manifest


def _evenly_spaced(subset: Any, count: int) -> Any:
    """At most ``count`` rows of a ``ClassSubset``, evenly spaced over it (so every class keeps images)."""
    rows = np.unique(np.linspace(0, len(subset) - 1, min(count, len(subset))).round().astype(int))
    return dataclasses.replace(
        subset, images=subset.images[rows], labels=subset.labels[rows], indices=subset.indices[rows]
    )


def measure(
    dataset_name: str, steps: int, batch_size: int, seed: int, workdir: str, max_images: int | None = None
) -> dict[str, Any]:
    """Images/s of ``pretrain`` on the cached and on the in-memory copy of the same base-class images.

    Args:
        dataset_name: a catalogue dataset with default roles (``ham10000``, ``ham10000-28``).
        steps: timed training steps per run.
        batch_size: images per step.
        seed: seeds the backbone and the batches.
        workdir: where the PNG files and the cache are written.
        max_images: at most this many images of each split, evenly spaced; all when ``None``.

    Returns:
        ``in_memory`` and ``cached`` (lists of images/s, in run order), ``ratio`` (mean cached / mean in
        memory), ``decode_seconds`` (first read, decoding into the cache), ``hit_seconds`` (second read),
        ``n_train``, ``image_size``, ``data_digest`` (of the catalogue dataset).
    """
    from fewshot_med.data import default_roles, load_dataset, select_classes
    from fewshot_med.data.cache import StreamOptions
    from fewshot_med.data.local import read_manifest

    dataset = load_dataset(dataset_name)
    roles = default_roles(dataset_name)
    assert roles is not None  # catalogue entries with default roles only
    subsets = {split: select_classes(dataset, split, roles.base) for split in ("train", "val")}
    if max_images is not None:
        subsets = {split: _evenly_spaced(subset, max_images) for split, subset in subsets.items()}
    folder = Path(workdir) / "streaming"
    manifest = _write_manifest(folder, subsets)
    size = dataset.image_shape[0]
    # decoded in this process: the speed suite measures in daemonic child processes, which may not
    # start DataLoader workers (the comparison is of training throughput, not of decoding)
    streaming = StreamOptions(True, str(folder / "cache"), workers=0)
    started = time.perf_counter()
    read_manifest(manifest, image_size=size, streaming=streaming)
    decode_seconds = time.perf_counter() - started
    started = time.perf_counter()
    streamed = read_manifest(manifest, image_size=size, streaming=streaming)
    hit_seconds = time.perf_counter() - started
    cached = {split: select_classes(streamed, split, roles.base) for split in ("train", "val")}
    if not isinstance(cached["train"].images, np.memmap):
        raise RuntimeError("streaming benchmark: the cached train images are not memory-mapped")
    in_memory = {split: dataclasses.replace(s, images=np.array(s.images)) for split, s in cached.items()}
    if not np.array_equal(in_memory["train"].images, subsets["train"].images):
        raise RuntimeError("streaming benchmark: the cached pixels differ from the dataset's")
    spec = backbone_spec(in_memory["train"], "resnet10t")
    settings = loop_settings(batch_size, steps)
    runs: dict[str, list[float]] = {"in_memory": [], "cached": []}
    for kind in ("in_memory", "cached", "in_memory", "cached"):
        data = in_memory if kind == "in_memory" else cached
        runs[kind].append(our_loop(data["train"], data["val"], spec, settings, seed))
    return {
        **runs,
        "ratio": statistics.mean(runs["cached"]) / statistics.mean(runs["in_memory"]),
        "decode_seconds": decode_seconds,
        "hit_seconds": hit_seconds,
        "n_train": len(cached["train"]),
        "image_size": size,
        "data_digest": dataset.digest,
    }


def markdown(result: dict[str, Any], batch_size: int, steps: int) -> list[str]:
    """The ``### Data larger than memory`` lines of the speed section."""
    return [
        "### Data larger than memory: cached (memmap) against in-memory pretraining",
        "",
        "| images | images/s (runs in order) |",
        "|---|---:|",
        *(
            f"| {label} | {' / '.join(f'{v:.0f}' for v in result[key])} |"
            for key, label in (("in_memory", "in memory"), ("cached", "on-disk cache, `numpy.memmap`"))
        ),
        f"| **ratio cached / in memory** | **{result['ratio']:.2f}** |",
        "",
        f"- {result['n_train']} base-class train images ({result['image_size']} px) written as PNG files "
        f"with a manifest, decoded into the cache in {result['decode_seconds']:.1f} s (in one "
        f"process), read again from it in {result['hit_seconds']:.2f} s; the in-memory copy holds the "
        "identical pixels.",
        f"- fewshot-med `pretrain`, batch {batch_size}, {steps} timed steps per run, no augmentation; runs "
        "alternate so drift shows. Target: ratio at least 0.9.",
        "",
    ]
