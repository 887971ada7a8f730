"""Cost of evaluating frozen-feature methods on 600 episodes, against one forward pass over the pool.

Embeddings are computed once per image; then every method fits all episodes in one batched call and
the metrics of all episodes are computed in one vectorised pass. The per-method time includes the
metrics (accuracy, AUROC, ECE variants, Brier, NLL, AURC, accuracy at 80% coverage).
Run: ``python -m benchmarks.scripts.eval_cost [--data ham10000] [--methods simpleshot logreg]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fewshot_med.data import default_roles, load_dataset, sample_episodes, select_classes
from fewshot_med.data.transforms import channel_stats
from fewshot_med.evaluation import evaluate_frozen
from fewshot_med.methods import MethodContext, create_method
from fewshot_med.models import BackboneSpec, create_backbone, embed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default="ham10000")
    parser.add_argument("--backbone", default="resnet10t")
    parser.add_argument("--methods", nargs="+", default=["simpleshot", "protonet", "r2d2", "logreg", "anil"])
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--episodes", type=int, default=600)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="timings per method; the median is printed")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")

    dataset = load_dataset(args.data)
    roles = default_roles(args.data)
    pool = select_classes(dataset, "test", roles.novel)
    base = select_classes(dataset, "train", roles.base)
    mean, std = channel_stats(base.images)
    spec = BackboneSpec(args.backbone, 3, dataset.image_shape[0], mean, std)
    backbone = create_backbone(spec.name, 3, spec.image_size).eval()
    embed(backbone, pool.images[:8], spec, device)  # warm-up
    forwards = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        features = embed(backbone, pool.images, spec, device)
        forwards.append(time.perf_counter() - start)
    forward = statistics.median(forwards)
    episodes = sample_episodes(pool, len(roles.novel), args.shots, 15, args.episodes, seed=0)
    start = time.perf_counter()
    assert len(episodes.arrays.support_rows) == args.episodes  # stacked once per list, shared by methods
    stacking = time.perf_counter() - start
    context = MethodContext(base_feature_mean=features.mean(dim=0))
    print(f"data={args.data} pool={len(pool)} images, {args.episodes} {args.shots}-shot episodes")
    print(f"one forward pass over the pool: {forward:.3f} s (medians of {args.repeats} timings)")
    print(f"stacking the episode list (once, shared by all methods): {stacking:.3f} s")
    for name in args.methods:
        timings = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            evaluate_frozen(
                lambda name=name: create_method(name, context), features, pool, episodes, label=name
            )
            timings.append(time.perf_counter() - start)
        seconds = statistics.median(timings)
        ratio = (forward + seconds) / forward
        print(f"{name:>11}: episodes {seconds:.3f} s; (forward + episodes) / forward = {ratio:.2f}")


if __name__ == "__main__":
    main()
