"""Attacks of several episodes in one batch against one small batch per episode.

``fewshot_med.robustness.evaluate.attack_queries`` attacks the queries of up to
``ATTACK_BATCH_IMAGES // m`` episodes in one call (``AdaptedModel`` fitted on all of them), and
``attack_support`` up to ``ATTACK_BATCH_IMAGES`` single support images (``SupportAttackModel``). This
times both against one call per episode (queries: ``ATTACK_BATCH_IMAGES`` lowered to one episode's
``m`` images) or per target (support: lowered to 1), on the same episodes: a random-init resnet10t on
the demo dataset's rare classes at ``--image-size`` px, one query per class of each 3-way 5-shot
episode, ProtoNet; FGSM and PGD-10 at 2/255 on the queries, PGD-10 at 2/255 on one support image for
each of 3 targets per episode. Medians over ``--repeats``; one JSON line per attack and setting, then
the speed-ups.

Run: ``python -m benchmarks.scripts.attack_batching [--episodes 10] [--image-size 64] [--threads 2]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from unittest import mock

import torch

from fewshot_med.data import sample_episodes, select_classes
from fewshot_med.data.demo import DEMO_NOVEL_CLASSES, make_demo_dataset
from fewshot_med.data.transforms import channel_stats
from fewshot_med.methods import MethodContext, create_method
from fewshot_med.models import BackboneSpec, create_backbone, embed
from fewshot_med.robustness import evaluate
from fewshot_med.robustness.adapted import FeatureModel, unit_images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=10)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dataset = make_demo_dataset(
        image_size=args.image_size, images_per_common_class=40, images_per_rare_class=60
    )
    pool = select_classes(dataset, "test", DEMO_NOVEL_CLASSES)
    spec = BackboneSpec("resnet10t", 3, args.image_size, *channel_stats(pool.images))
    backbone = create_backbone(spec.name, spec.in_chans, args.image_size).eval()
    features = embed(backbone, pool.images, spec, torch.device("cpu"))
    episodes = sample_episodes(pool, 3, 5, 3, args.episodes, seed=0)
    settings = evaluate.RobustnessSettings(
        epsilons=(2 / 255,), steps=(10,), check_epsilon=2 / 255, episodes=args.episodes, support_targets=3
    )
    factory = lambda: create_method("protonet", MethodContext())  # noqa: E731
    model, images = FeatureModel(backbone, spec), unit_images(pool.images)

    attacks = {"queries": evaluate.attack_queries, "support": evaluate.attack_support}

    def seconds(attack: str, per_call_images: int) -> float:
        times = []
        for _ in range(args.repeats):
            with mock.patch.object(evaluate, "ATTACK_BATCH_IMAGES", per_call_images):
                started = time.perf_counter()
                attacks[attack](factory, "protonet", model, images, features, pool, episodes, settings)
                times.append(time.perf_counter() - started)
        return statistics.median(times)

    unbatched = {"queries": 3 * settings.queries_per_class, "support": 1}
    for attack, alone in unbatched.items():
        one_by_one, batched = seconds(attack, alone), seconds(attack, evaluate.ATTACK_BATCH_IMAGES)
        for setting, value in (("one call per episode or target", one_by_one), ("batched", batched)):
            record = {"attack": attack, "setting": setting, "seconds": round(value, 2)}
            record |= {"episodes": args.episodes, "image_size": args.image_size, "threads": args.threads}
            print(json.dumps(record))
        print(f"{attack}: speed-up {one_by_one / batched:.1f}x")


if __name__ == "__main__":
    main()
