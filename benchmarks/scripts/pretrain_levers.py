"""Pretraining levers decided on several training seeds: the evidence behind a recipe change.

For every arm (a named set of ``--set`` overrides of the config; the first arm is the reference) and
every training seed, pretrains a backbone on the base classes (the config's ``pretrain`` section; no
meta-training), then scores SimpleShot and logistic regression on the novel classes at K shots: the
val episodes (the signal the protocol allows choosing on) and the test episodes (for reading only),
the same seeded episode lists for every arm and seed. Runs seed by seed (every arm of seed 0 first)
and prints one JSON line per arm and seed, and after each seed a markdown table: per arm, the mean ±
standard deviation over training seeds, and the paired difference from the reference arm over seeds
(each seed's arms share their episode lists and initial weights).
A lever is kept only when its val difference is positive for every seed. With ``--ensemble``, each
arm's backbones of all seeds are also scored as one ensemble (``ensemble_record``), against each
single backbone. Everything is logged to an MLflow run in the ``benchmarks`` experiment.

Run: ``python -m benchmarks.scripts.pretrain_levers configs/ham10000.yaml --seeds 0 1 2``
``--arm reference --arm mixup:pretrain.mixing=mixup --arm cutmix:pretrain.mixing=cutmix``
``[--set data.source=ham10000-28] [--ensemble]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fewshot_med import tracking
from fewshot_med.config import Config, load_config
from fewshot_med.data import ClassSubset, sample_episodes
from fewshot_med.data.episodes import EpisodeList
from fewshot_med.evaluation import evaluate_frozen
from fewshot_med.methods import MethodContext, create_method
from fewshot_med.models import embed
from fewshot_med.pipelines.stages import Data, load_data, starting_backbone
from fewshot_med.runtime import resolve_device, seed_everything
from fewshot_med.tracking import names
from fewshot_med.training.pretrain import pretrain

#: Frozen-feature methods scored on each backbone (cheap, and the two families of the toolkit's heads).
PROBES = ("simpleshot", "logreg")
SPLITS = ("val", "test")


@dataclass(frozen=True)
class Arm:
    """A named variant of the config: ``name`` and its ``--set`` overrides."""

    name: str
    overrides: tuple[str, ...]


def parse_arm(text: str) -> Arm:
    """``NAME`` or ``NAME:key=value[;key=value…]`` -> an ``Arm``."""
    name, _, rest = text.partition(":")
    return Arm(name, tuple(item for item in rest.split(";") if item))


def novel_pools(data: Data) -> dict[str, ClassSubset]:
    """The novel-class images of the val and test splits."""
    return {split: data.subset(split, "novel") for split in SPLITS}


def novel_episodes(
    config: Config, pools: dict[str, ClassSubset], n_val: int, n_test: int, shots: int
) -> dict[str, EpisodeList]:
    """The seeded val and test episode lists of the novel classes (the same for every arm and seed)."""
    draw, counts = config.episodes, {"val": n_val, "test": n_test}
    return {
        split: sample_episodes(pool, len(pool.class_names), shots, draw.n_query, counts[split], draw.seed)
        for split, pool in pools.items()
    }


def score_seed(
    config: Config, n_val: int, n_test: int, shots: int
) -> tuple[dict[str, float | str], dict[str, torch.Tensor]]:
    """Pretrain one backbone with ``config`` (its seed) and score the probes on novel val/test episodes.

    Returns:
        The record, and per split the ``(N, D)`` novel features centred on the base-train mean and
        L2-normalised (SimpleShot's CL2N), for ``ensemble_record``.
    """
    device = resolve_device(config.runtime.device)
    seed_everything(config.seed)
    data = load_data(config)
    base_train, base_val = data.subset("train", "base"), data.subset("val", "base")
    pools = novel_pools(data)
    episodes = novel_episodes(config, pools, n_val, n_test, shots)
    backbone, spec = starting_backbone(config, data)  # as the pipeline builds it: weights, normalisation
    settings = config.pretrain.model_copy(update={"early_stopping_patience": None})
    started = time.perf_counter()
    pretrain(backbone, spec, base_train, base_val, settings, device, seed=config.seed)
    record: dict[str, float | str] = {"pretrain_seconds": time.perf_counter() - started}
    base_mean = embed(backbone, base_train.images, spec, device).mean(dim=0)
    features = {split: embed(backbone, pool.images, spec, device) for split, pool in pools.items()}
    record.update(score_probes(features, base_mean, pools, episodes))
    record["data_digest"] = data.dataset.digest
    centred = {split: F.normalize(values - base_mean, dim=1) for split, values in features.items()}
    return record, centred


def score_probes(
    features: dict[str, torch.Tensor],
    base_mean: torch.Tensor,
    pools: dict[str, ClassSubset],
    episodes: dict[str, EpisodeList],
) -> dict[str, float]:
    """``{"<split>.<probe>": accuracy in %}`` of every probe on each split's ``(N, D)`` novel features."""
    context = MethodContext(base_feature_mean=base_mean)
    scores = {}
    for split, values in features.items():
        for probe in PROBES:
            make = lambda probe=probe: create_method(probe, context)  # noqa: E731
            result = evaluate_frozen(make, values, pools[split], episodes[split])
            scores[f"{split}.{probe}"] = 100 * result.summary()["accuracy"][0]
    return scores


def ensemble_record(
    config: Config, per_seed: list[dict[str, torch.Tensor]], n_val: int, n_test: int, shots: int
) -> dict[str, float]:
    """The probes on an ensemble of one arm's backbones (one per training seed): each backbone's
    centred, L2-normalised ``(N, D)`` features concatenated to ``(N, S · D)`` and scaled by ``1/√S``
    (unit norm again), so every backbone weighs the same in the probes' distances and dot products."""
    pools = novel_pools(load_data(config))
    episodes = novel_episodes(config, pools, n_val, n_test, shots)
    joined = {
        split: torch.cat([seed[split] for seed in per_seed], dim=1) / len(per_seed) ** 0.5 for split in SPLITS
    }
    zero_mean = torch.zeros(joined["val"].shape[1])  # already centred per backbone
    return score_probes(joined, zero_mean, pools, episodes)


def ensemble_table(
    records: dict[str, dict[int, dict[str, float | str]]], ensembles: dict[str, dict[str, float]]
) -> str:
    """Markdown: per arm, the ensemble of its seeds' backbones against each single backbone."""
    columns = [f"{split}.{probe}" for split in SPLITS for probe in PROBES]
    lines = [
        f"| arm | backbones | {' | '.join(f'{c}: ensemble (mean single)' for c in columns)} | "
        f"{' | '.join(f'Δ {c} vs each single' for c in columns)} |",
        "|---|---|" + "---|" * (2 * len(columns)),
    ]
    for arm, ensemble in ensembles.items():
        seeds = sorted(records[arm])
        cells, deltas = [], []
        for column in columns:
            singles = [records[arm][s][column] for s in seeds]
            cells.append(f"{ensemble[column]:.1f} ({statistics.mean(singles):.1f})")
            deltas.append(", ".join(f"{ensemble[column] - single:+.1f}" for single in singles))
        lines.append(f"| {arm} | {len(seeds)} | {' | '.join(cells)} | {' | '.join(deltas)} |")
    return "\n".join(lines)


def summary_table(records: dict[str, dict[int, dict[str, float | str]]], shots: int) -> str:
    """Markdown: per arm and column, mean ± sd over seeds and the paired difference from the first arm."""
    arms = list(records)
    reference = records[arms[0]]
    columns = [f"{split}.{probe}" for split in SPLITS for probe in PROBES]
    lines = [
        f"| arm | seeds | {' | '.join(f'{c} ({shots}-shot)' for c in columns)} | "
        f"{' | '.join(f'Δ {c} (per seed)' for c in columns)} |",
        "|---|---|" + "---|" * (2 * len(columns)),
    ]
    for arm in arms:
        seeds = sorted(records[arm])
        cells = []
        for column in columns:
            values = [records[arm][s][column] for s in seeds]
            spread = statistics.stdev(values) if len(values) > 1 else float("nan")
            cells.append(f"{statistics.mean(values):.1f} ± {spread:.1f}")
        deltas = []
        for column in columns:
            paired = [records[arm][s][column] - reference[s][column] for s in seeds if s in reference]
            per_seed = ", ".join(f"{d:+.1f}" for d in paired)
            deltas.append(f"{statistics.mean(paired):+.1f} ({per_seed})" if paired else "—")
        lines.append(f"| {arm} | {len(seeds)} | {' | '.join(cells)} | {' | '.join(deltas)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("--arm", dest="arms", action="append", type=parse_arm, default=[])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--val-episodes", type=int, default=200)
    parser.add_argument("--test-episodes", type=int, default=600)
    parser.add_argument(
        "--ensemble", action="store_true", help="also score each arm's backbones of all seeds as one ensemble"
    )
    args = parser.parse_args()
    arms = args.arms or [Arm("reference", ())]
    base = load_config(args.config, args.overrides)  # validates the shared overrides once, up front
    configs = {  # seed-major: a run stopped early still holds every arm of its finished seeds
        (arm.name, seed): load_config(args.config, [*args.overrides, *arm.overrides, f"seed={seed}"])
        for seed in args.seeds
        for arm in arms
    }
    records: dict[str, dict[int, dict[str, float | str]]] = {arm.name: {} for arm in arms}
    features: dict[str, list[dict[str, torch.Tensor]]] = {arm.name: [] for arm in arms}
    command = {"config": args.config, "overrides": args.overrides, "arms": [a.__dict__ for a in arms]}
    tags = {"command": json.dumps(command)}
    with tracking.benchmark_run("pretrain-levers", tags=tags, settings=base.tracking):
        for (arm, seed), config in configs.items():
            record, centred = score_seed(config, args.val_episodes, args.test_episodes, args.shots)
            records[arm][seed] = record
            features[arm].append(centred)
            print(json.dumps({"arm": arm, "seed": seed, **record}), flush=True)
            prefix = (base.name, args.shots, arm, f"seed{seed}")
            numbers = {key: value for key, value in record.items() if isinstance(value, float)}
            tracking.log_metrics({names.benchmark_metric(*prefix, k): v for k, v in numbers.items()})
            if arm == arms[-1].name:  # a seed is complete: the table so far
                print(summary_table({name: runs for name, runs in records.items() if runs}, args.shots))
        table = summary_table(records, args.shots)
        if args.ensemble and len(args.seeds) > 1:
            ensembles = {}
            for arm in arms:
                config = configs[(arm.name, args.seeds[0])]
                ensembles[arm.name] = ensemble_record(
                    config, features[arm.name], args.val_episodes, args.test_episodes, args.shots
                )
                prefix = (base.name, args.shots, arm.name, "ensemble")
                tracking.log_metrics(
                    {names.benchmark_metric(*prefix, k): v for k, v in ensembles[arm.name].items()}
                )
            table += "\n\nEnsembles of each arm's backbones:\n\n" + ensemble_table(records, ensembles)
        tracking.log_text_artifact(table, "pretrain_levers.md")
    print(table)


if __name__ == "__main__":
    main()
