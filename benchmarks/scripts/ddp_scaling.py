"""Pretraining throughput in 1 process against N processes under torchrun (gloo on the CPU, NCCL on GPUs).

Pretrains the config's backbone (its ``pretrain`` section, ``--epochs`` epochs, no early stopping,
untracked) once as one plain process and once as ``torchrun --standalone --nproc_per_node N``, each
process with one thread (``OMP_NUM_THREADS=1``, ``runtime.num_threads=1``). Both runs have the same
global batch, so the same optimizer steps. Prints one JSON line per run and a markdown table: wall
seconds, training images/s of all processes (the mean over epochs of the loop's own
``images_per_second``, validation excluded), images/s per process, and the speed-up over 1 process.

Run: ``python -m benchmarks.scripts.ddp_scaling configs/pbc.yaml --epochs 2 [--nproc 2] [--set k=v]``;
``--quick`` is a smoke run (1 epoch of 4 steps).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fewshot_med.config import load_config
from fewshot_med.models import load_checkpoint

QUICK = ("pretrain.epochs=1", "pretrain.steps_per_epoch=4")


def time_pretraining(config: Path, nproc: int, overrides: list[str], folder: Path) -> dict[str, float]:
    """Pretrain in ``nproc`` processes (a plain process for 1); wall seconds and images/s from the
    checkpoint's history."""
    output = folder / f"nproc{nproc}"
    sets = [*overrides, f"runtime.output_dir={output}", "runtime.num_threads=1", "tracking.enabled=false"]
    command = ["-m", "fewshot_med", "pretrain", str(config), *(a for s in sets for a in ("--set", s))]
    if nproc > 1:
        command = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *command]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    started = time.perf_counter()
    subprocess.run([sys.executable, *command], env=env, check=True, cwd=folder)
    wall = time.perf_counter() - started
    name = load_config(config, sets).name
    history = load_checkpoint(output / name / "pretrain.pt")["history"]
    total = statistics.fmean(record["images_per_second"] for record in history)
    return {"nproc": nproc, "wall_seconds": wall, "images_per_second": total, "per_process": total / nproc}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--nproc", type=int, default=2, help="processes of the distributed run")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 epoch of 4 steps")
    args = parser.parse_args()
    overrides = [f"pretrain.epochs={args.epochs}", "pretrain.early_stopping_patience=null", *args.overrides]
    if args.quick:
        overrides += QUICK
    rows = []
    with tempfile.TemporaryDirectory(prefix="ddp-scaling-") as folder:
        for nproc in (1, args.nproc):
            row = time_pretraining(args.config.resolve(), nproc, overrides, Path(folder))
            row["speed_up"] = row["images_per_second"] / rows[0]["images_per_second"] if rows else 1.0
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n| processes | wall s | images/s (all) | images/s per process | speed-up |")
    print("|---:|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['nproc']} | {row['wall_seconds']:.1f} | {row['images_per_second']:.0f} | "
            f"{row['per_process']:.0f} | {row['speed_up']:.2f}x |"
        )


if __name__ == "__main__":
    main()
