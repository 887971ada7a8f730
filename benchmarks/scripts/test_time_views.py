"""Test-time views (features averaged over the 8 dihedral symmetries) against plain features, on val
and on test episodes, for every frozen-feature method of a config.

Per method and K, each view set gets what the evaluate stage would do with it: the method's search
(if any) run on the val episodes, then the chosen combination on the test episodes. Printed: val
accuracy (the decision signal), test accuracy, and the dihedral-minus-plain differences paired over
the same episodes (95% CI), as a markdown table; the last line says which view set the val episodes
favour (mean paired val difference over all methods and Ks) and whether test agrees.

Run: ``python -m benchmarks.scripts.test_time_views CONFIG --from RUN [--threads N]``; ``--quick``
trains a 1-epoch backbone on the config instead (a smoke run, untracked; numbers mean nothing).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

from fewshot_med.config import Config, load_config
from fewshot_med.data import ClassSubset
from fewshot_med.evaluation.intervals import paired_difference_ci95
from fewshot_med.evaluation.runner import EpisodeResults, evaluate_frozen
from fewshot_med.methods import METHODS, create_method
from fewshot_med.models import embed
from fewshot_med.pipelines.episodes import Episodes, draw_episodes
from fewshot_med.pipelines.evaluation import search_on_val
from fewshot_med.pipelines.stages import StageContext, open_context
from fewshot_med.pipelines.transfer import backbone_stages

VIEW_SETS = ("identity", "dihedral")
QUICK = (
    "pretrain.epochs=1",
    "pretrain.steps_per_epoch=2",
    "pretrain.warmup_epochs=0",
    "meta_train.enabled=false",
    "episodes.n_test_episodes=6",
    "episodes.n_val_episodes=6",
    "tracking.enabled=false",
)


#: The image sets the comparison embeds: role and split.
SUBSETS = {"base": ("base", "train"), "val": ("novel", "val"), "test": ("novel", "test")}


def scored(
    context: StageContext,
    config: Config,
    subsets: dict[str, ClassSubset],
    episodes: Episodes,
    views: str,
) -> dict[tuple[str, int], tuple[EpisodeResults, EpisodeResults]]:
    """(method label, K) -> (val, test) results of every frozen-feature method with ``views``."""
    backbone, spec = context.trained()
    spec = dataclasses.replace(spec, views=views)
    features = {
        name: embed(backbone, subset.images, spec, context.device, config.evaluation.batch_size)
        for name, subset in subsets.items()
    }
    methods = dataclasses.replace(context.method_context(features["base"].mean(dim=0)), spec=spec)
    results = {}
    for method in config.methods:
        if METHODS[method.name].inputs != "features":
            continue
        for k in episodes.test:
            val_episodes, chosen, val = episodes.val[k], {}, None
            if method.search:
                chosen, val, _ = search_on_val(
                    method, methods, features["val"], subsets["val"], val_episodes, {}
                )
            factory = partial(create_method, method.name, methods, **method.params, **chosen)
            if val is None:
                val = evaluate_frozen(factory, features["val"], subsets["val"], val_episodes)
            test = evaluate_frozen(factory, features["test"], subsets["test"], episodes.test[k])
            results[method.display_name, k] = (val, test)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("--from", dest="from_run", help="the pipeline run whose backbone is read")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override")
    parser.add_argument("--quick", action="store_true", help="smoke run: a 1-epoch backbone, 6 episodes")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.quick and args.from_run is None:
        parser.error("--from RUN is required (or --quick)")
    started = time.perf_counter()
    config = load_config(args.config, [*args.overrides, *(QUICK if args.quick else ())])
    context = open_context(config)
    context = backbone_stages(
        context, ("pretrain",) if args.quick else (), None if args.quick else args.from_run
    )
    subsets = {name: context.data.subset(split, role) for name, (role, split) in SUBSETS.items()}
    episodes = draw_episodes(
        config, {"test": subsets["test"], "val": subsets["val"]}, context.n_way, val=True
    )
    plain, views = (scored(context, config, subsets, episodes, name) for name in VIEW_SETS)
    print("| method | K | val plain | val dihedral | val Δ | test plain | test dihedral | test Δ |")
    print("|---|---|---|---|---|---|---|---|")
    val_deltas, test_deltas = [], []
    for key in plain:
        (val_a, test_a), (val_b, test_b) = plain[key], views[key]
        val_d = paired_difference_ci95(val_b.values("accuracy"), val_a.values("accuracy"))
        test_d = paired_difference_ci95(test_b.values("accuracy"), test_a.values("accuracy"))
        val_deltas.append(val_d[0])
        test_deltas.append(test_d[0])
        cells = [f"{100 * r.values('accuracy').mean():.1f}" for r in (val_a, val_b)]
        cells.append(f"{100 * val_d[0]:+.1f} ± {100 * val_d[1]:.1f}")
        cells += [f"{100 * r.values('accuracy').mean():.1f}" for r in (test_a, test_b)]
        cells.append(f"{100 * test_d[0]:+.1f} ± {100 * test_d[1]:.1f}")
        print(f"| {key[0]} | {key[1]} | " + " | ".join(cells) + " |")
    favoured = VIEW_SETS[int(np.mean(val_deltas) > 0)]
    agrees = (np.mean(test_deltas) > 0) == (favoured == "dihedral")
    print(
        f"\nval favours {favoured} (mean paired val difference {100 * np.mean(val_deltas):+.2f} points); "
        f"test {'agrees' if agrees else 'disagrees'} ({100 * np.mean(test_deltas):+.2f}); "
        f"{time.perf_counter() - started:.0f} s"
    )


if __name__ == "__main__":
    main()
