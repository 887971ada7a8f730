"""End-to-end wall time per stage and peak memory of a pipeline config.

Run: ``python -m benchmarks.scripts.pipeline_wall configs/quickstart.yaml [--set key=value …]``.
Prints the seconds of each stage, the total, and the process's peak resident memory.
"""

from __future__ import annotations

import argparse
import platform
import resource
import time

import torch

from fewshot_med.config import load_config
from fewshot_med.pipelines.transfer import run_stages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("config")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    config = load_config(args.config, args.overrides)
    start = time.perf_counter()
    outcome = run_stages(config)
    total = time.perf_counter() - start
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"config={args.config} overrides={args.overrides} seed={config.seed} run={outcome.run_id}")
    print(f"machine: {platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}")
    for stage, seconds in outcome.seconds.items():
        print(f"{stage:>10}: {seconds:7.1f} s")
    print(f"{'total':>10}: {total:7.1f} s (including data loading and MLflow setup)")
    print(f"peak resident memory: {peak_gib:.2f} GiB")


if __name__ == "__main__":
    main()
