"""Data larger than memory: local images decoded once into the on-disk cache and read memory-mapped."""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from fewshot_med.config import Config
from fewshot_med.data import cache, select_classes
from fewshot_med.data.cache import StreamOptions
from fewshot_med.data.local import read_image_folder, read_manifest
from fewshot_med.errors import DataError

ROOT = Path(__file__).resolve().parents[2]
CLASSES = ("a", "b", "c", "d")
SPLIT_OF_ROW = ("train",) * 7 + ("val", "test", "test")


def _write_pngs(folder: Path, start: int, stop: int, size: int = 16) -> list[str]:
    """Grey PNGs ``start..stop-1`` (class = row mod 4, noise around a class brightness), in subfolders
    of 1000; returns their manifest rows ``path,label,split``."""
    rng = np.random.default_rng(start)
    rows = []
    for row in range(start, stop):
        label = row % len(CLASSES)
        pixels = np.clip(rng.normal(60 * label + 40, 30, (size, size)), 0, 255).astype(np.uint8)
        relative = f"{row // 1000}/{row}.png"
        (folder / relative).parent.mkdir(exist_ok=True)
        Image.fromarray(pixels).save(folder / relative, compress_level=1)
        rows.append(f"{relative},{CLASSES[label]},{SPLIT_OF_ROW[row % len(SPLIT_OF_ROW)]}")
    return rows


def _manifest(folder: Path, n_images: int, processes: int = 1) -> Path:
    """A manifest of ``n_images`` generated PNGs; rows sorted by split, so each split is one block."""
    folder.mkdir(exist_ok=True)
    bounds = np.linspace(0, n_images, processes * 8 + 1).astype(int)
    jobs = [(folder, int(a), int(b)) for a, b in itertools.pairwise(bounds)]
    if processes > 1:
        with Pool(processes) as pool:
            parts = pool.starmap(_write_pngs, jobs)
    else:
        parts = [_write_pngs(*job) for job in jobs]
    rows = sorted(
        (row for part in parts for row in part),
        key=lambda r: ("train", "val", "test").index(r.rsplit(",", 1)[1]),
    )
    manifest = folder / "manifest.csv"
    manifest.write_text("path,label,split\n" + "\n".join(rows) + "\n")
    return manifest


@pytest.fixture(scope="module")
def small_manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _manifest(tmp_path_factory.mktemp("images"), 80)


def _streamed(manifest: Path, cache_dir: Path, workers: int = 0):
    return read_manifest(
        manifest, image_size=12, duplicates="error", streaming=StreamOptions(True, str(cache_dir), workers)
    )


def test_streamed_dataset_is_mapped_and_equals_the_in_memory_one(small_manifest, tmp_path):
    in_memory = read_manifest(
        small_manifest, image_size=12, duplicates="error", streaming=StreamOptions(False)
    )
    streamed = _streamed(small_manifest, tmp_path)
    for name, split in streamed.splits.items():
        assert isinstance(split.images, np.memmap), name
        np.testing.assert_array_equal(split.images, in_memory.splits[name].images)
        np.testing.assert_array_equal(split.labels, in_memory.splits[name].labels)
    assert streamed.digest == in_memory.digest
    base = select_classes(streamed, "train", ["a", "c"])  # rows interleaved with b, d: a derived file
    assert isinstance(base.images, np.memmap)
    np.testing.assert_array_equal(base.images, select_classes(in_memory, "train", ["a", "c"]).images)


def test_second_load_reads_the_cache_without_decoding(small_manifest, tmp_path, monkeypatch):
    first = _streamed(small_manifest, tmp_path)

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again")

    monkeypatch.setattr(cache, "read_image_and_digest", no_decoding)
    second = _streamed(small_manifest, tmp_path)
    assert second.digest == first.digest
    assert len(list(tmp_path.iterdir())) == 1


def test_a_changed_file_gets_a_new_cache_entry(tmp_path):
    manifest = _manifest(tmp_path / "images", 40)
    before = _streamed(manifest, tmp_path / "cache")
    changed = tmp_path / "images" / "0" / "0.png"  # row 0: first train image
    Image.fromarray(np.full((16, 16), 255, np.uint8)).save(changed)
    stat = changed.stat()
    os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a later mtime, whatever the clock
    after = _streamed(manifest, tmp_path / "cache")
    assert (after.splits["train"].images[0] == 255).all()
    assert not (before.splits["train"].images[0] == 255).all()
    assert after.digest != before.digest
    assert len([p for p in (tmp_path / "cache").iterdir() if p.is_dir()]) == 2


def test_corrupt_image_in_a_streamed_folder_names_the_file(tmp_path):
    for label in ("x", "y"):
        (tmp_path / "data" / label).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(np.full((8, 8), 40 * i + (label == "y"), np.uint8)).save(
                tmp_path / "data" / label / f"{i}.png"
            )
    broken = tmp_path / "data" / "y" / "3.png"
    broken.write_bytes(broken.read_bytes()[:40])  # truncated
    with pytest.raises(DataError) as in_memory:
        read_image_folder(tmp_path / "data", image_size=8, streaming=StreamOptions(False))
    with pytest.raises(DataError) as streamed:  # decoded in two worker processes
        read_image_folder(
            tmp_path / "data", image_size=8, streaming=StreamOptions(True, str(tmp_path / "c"), 2)
        )
    assert str(streamed.value) == str(in_memory.value)
    assert str(broken) in str(streamed.value) and "\n" not in str(streamed.value)
    assert [p.name for p in (tmp_path / "c").iterdir()] == []  # no half-written entry


def test_stream_setting_is_validated():
    data = {"name": "x", "data": {"source": "demo"}}
    for value, expected in (("auto", "auto"), (True, True), ("false", False)):
        assert (
            Config.model_validate({**data, "data": {"source": "demo", "stream": value}}).data.stream
            == expected
        )
    with pytest.raises(ValueError, match="stream"):
        Config.model_validate({**data, "data": {"source": "demo", "stream": "sometimes"}})
    assert not StreamOptions("auto").applies(1000, 64) and StreamOptions("auto").applies(100_000, 64)


#: the acceptance bound of issue 16: one epoch on 200,000 images in under 3 GiB
PEAK_RSS_LIMIT_KIB = 3 * 1024 * 1024


@pytest.mark.slow
def test_one_epoch_on_200k_streamed_images_stays_under_3_gib(tmp_path, empty_store):
    manifest = _manifest(tmp_path / "images", 200_000, processes=2)
    config = {
        "name": "streaming",
        "data": {
            "source": str(manifest),
            "image_size": 16,
            "stream": True,
            "cache_dir": str(tmp_path / "cache"),
            "decode_workers": 2,
            "base_classes": ["a", "b", "d"],
            "novel_classes": ["c"],
        },
        "model": {"backbone": "resnet10t"},
        # one epoch, capped at 10 steps: the bound is on the data path (decode, map, select, normalise,
        # digest, log), which sees all 200,000 images whatever the number of steps
        "pretrain": {"epochs": 1, "batch_size": 512, "steps_per_epoch": 10, "warmup_epochs": 0},
        "runtime": {"num_threads": 2, "output_dir": str(tmp_path / "outputs")},
    }
    (tmp_path / "streaming.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "mlruns").mkdir()
    shutil.copy(empty_store, tmp_path / "mlruns" / "mlflow.db")
    env = {"PATH": os.environ["PATH"], "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "HOME": str(tmp_path)}
    log = (tmp_path / "log.txt").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "fewshot_med", "pretrain", "streaming.yaml"],
        cwd=tmp_path,
        env=env,
        stdout=log,
        stderr=log,
    )
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    output = (tmp_path / "log.txt").read_text()
    assert process.returncode == 0, output[-3000:]
    assert usage.ru_maxrss < PEAK_RSS_LIMIT_KIB, f"peak RSS {usage.ru_maxrss / 2**20:.2f} GiB"
    entry = next((tmp_path / "cache").iterdir())
    assert np.load(entry / "images.npy", mmap_mode="r").shape == (200_000, 16, 16, 1)
    print(f"peak RSS of the pretraining process: {usage.ru_maxrss / 2**20:.2f} GiB")
