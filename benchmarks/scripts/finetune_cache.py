"""Head-only fine-tuning with the support features cached up front, against a backbone pass per step.

``finetune`` with ``mode: head`` trains only its head, so it embeds every step's augmented support
batch before training, in passes of up to ``batch_size`` images (``FineTune._support_features``).
This times one fit both ways on the same episode (random 64 px images, the HAM10000 pipeline's
resnet10t at its default 50 steps), medians over repeats; the trained heads are the same
(``tests/methods/test_finetune_cache.py``).
Run: ``python -m benchmarks.scripts.finetune_cache [--shots 5] [--threads 1] [--repeats 5]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from unittest import mock

import torch

from fewshot_med.methods import MethodContext, create_method
from fewshot_med.methods.finetune import FineTune
from fewshot_med.models import create_backbone


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--ways", type=int, default=3)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    backbone = create_backbone("resnet10t", image_size=args.image_size).eval()
    context = MethodContext(backbone=backbone, seed=0)
    generator = torch.Generator().manual_seed(0)
    support = torch.randn(args.ways * args.shots, 3, args.image_size, args.image_size, generator=generator)
    labels = torch.arange(args.ways).repeat_interleave(args.shots)

    def seconds() -> float:
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            create_method("finetune", context, mode="head", steps=args.steps).fit(support, labels)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    cached = seconds()
    with mock.patch.object(FineTune, "_support_features", lambda self, *a: None):
        per_step = seconds()
    print(
        f"{args.ways}-way {args.shots}-shot head fine-tuning, {args.steps} steps, {args.image_size} px, "
        f"{args.threads} thread(s), median of {args.repeats}: a pass per step {per_step:.2f} s, "
        f"cached {cached:.2f} s ({per_step / cached:.2f}x)"
    )


if __name__ == "__main__":
    main()
