"""Do the priors help once fine-tuning moves the weights? A fair test of L2-SP, the SWAG prior and BMA.

The Bayesian-transfer suite found no prior that beats plain fine-tuning, but there the fine-tuned
block barely moved (AdamW at ``backbone_lr`` 1e-4 for 30 steps: Adam's steps are about the learning
rate whatever the loss, so neither the cross-entropy nor the prior can move a weight further than
30 · 1e-4). This script fine-tunes the backbone of a pipeline run in regimes where the weights do move
(the whole network, a 10-100 times larger rate, and SGD, whose steps scale with the gradient, prior
included) and, in each regime, compares on the same test episodes:

- ``none``: plain fine-tuning;
- ``l2sp``: MAP under L2-SP (Li, Grandvalet & Davoine, ICML 2018), its weight chosen on the first val
  episodes from ``--l2sp-weights`` (the most accurate; ties to the smaller weight);
- ``swag``: MAP under the SWAG posterior of pretraining (Shwartz-Ziv et al., NeurIPS 2022), its scale
  chosen the same way from ``--swag-scales``, only when the run has a posterior (``pretrain.swag``);
- ``bma``: plain fine-tuning scored by Bayesian model averaging over a SWAG posterior of its last 10
  steps (10 samples; Maddox et al., NeurIPS 2019).

For every regime and arm it prints test accuracy, pooled ECE after the val temperature (fitted on the
arm's own val episodes), the paired accuracy difference against ``none`` on the same episodes, and how
far fine-tuning moved the trainable backbone weights: the median over episodes of
``‖θ - θ₀‖ / ‖θ₀‖``, so a reader sees whether there was anything to regularise.

Full fine-tuning costs about 8 s per 5-shot episode on 2 CPU cores (50 steps at 64 px), hence the
first 30 test and 15 val episodes by default.

Run: ``python -m benchmarks.scripts.prior_fair_test CONFIG --from RUN [--shots 5] [--episodes 30]``
``[--val-episodes 15] [--threads N]``; ``--quick`` runs two steps on two episodes (for tests).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fewshot_med import tracking
from fewshot_med.config import load_config
from fewshot_med.data import ClassSubset, EpisodeList
from fewshot_med.data.transforms import to_model_input
from fewshot_med.evaluation.calibration import calibrate_with_val_episodes
from fewshot_med.evaluation.intervals import paired_difference_ci95
from fewshot_med.evaluation.metrics import pooled_ece, softmax
from fewshot_med.evaluation.runner import EpisodeResults, evaluate_images
from fewshot_med.methods import FewShotMethod, MethodContext, create_method
from fewshot_med.pipelines.episodes import draw_episodes
from fewshot_med.pipelines.stages import open_context
from fewshot_med.pipelines.transfer import backbone_stages
from fewshot_med.tracking import names

#: Fine-tuning regimes (MLflow key: description, ``finetune`` parameters): the Bayesian-transfer
#: suite's, and two that move the weights.
REGIMES: dict[str, tuple[str, dict[str, Any]]] = {
    "bayes_suite": (
        "AdamW, last block, 30 steps, backbone lr 1e-4 (the bayes suite's)",
        {"mode": "last_block", "steps": 30, "backbone_lr": 1e-4},
    ),
    "adamw_full": (
        "AdamW, full, 50 steps, backbone lr 1e-3",
        {"mode": "full", "steps": 50, "backbone_lr": 1e-3},
    ),
    "sgd_full": (
        "SGD, full, 50 steps, lr 1e-2",
        {"mode": "full", "steps": 50, "optimizer": "sgd", "lr": 1e-2, "backbone_lr": 1e-2},
    ),
}
BMA = {"bma_samples": 10, "bma_snapshots": 10}
QUICK = {"steps": 2}
QUICK_BMA = {"bma_samples": 2, "bma_snapshots": 2}


def relative_drift(backbone: nn.Module, start: dict[str, torch.Tensor]) -> float:
    """``‖θ - θ₀‖ / ‖θ₀‖``, θ the parameters of a fine-tuned ``backbone`` named in ``start`` (the
    trainable ones, at their starting values θ₀)."""
    moved, norm = 0.0, 0.0
    for name, param in backbone.named_parameters():
        if name in start:
            moved += float((param.detach().cpu() - start[name]).pow(2).sum())
            norm += float(start[name].pow(2).sum())
    return (moved / norm) ** 0.5


def trainable_start(
    backbone: nn.Module, params: dict[str, Any], context: MethodContext
) -> dict[str, torch.Tensor]:
    """The starting values of the backbone parameters that ``finetune`` with ``params`` trains (by the
    method's own rule, applied to a copy)."""
    trainable = create_method("finetune", context, **params)._unfreeze(copy.deepcopy(backbone))
    return {name: param.detach().cpu().clone() for name, param in trainable}


def accuracy_or_nan(results: EpisodeResults) -> float:
    """Mean accuracy over episodes, NaN when fine-tuning diverged (non-finite logits) on any."""
    return results.summary()["accuracy"][0] if results.n_failed == 0 else float("nan")


def run_arm(
    params: dict[str, Any],
    context: MethodContext,
    pool: ClassSubset,
    episodes: EpisodeList,
    to_input: Callable[[np.ndarray], torch.Tensor],
    start: dict[str, torch.Tensor],
    label: str,
) -> tuple[EpisodeResults, float]:
    """Fine-tune with ``params`` on every episode: the results and the median relative drift."""
    fitted: list[FewShotMethod] = []

    def factory() -> FewShotMethod:
        method = create_method("finetune", context, **params)
        fitted.append(method)
        return method

    results = evaluate_images(factory, pool.images, pool, episodes, to_input, label=label)
    return results, float(np.median([relative_drift(method.backbone_, start) for method in fitted]))


@dataclasses.dataclass
class Setting:
    """What every arm of a comparison shares: the method context, the episodes of each split, their
    images' input transform, and the options of the arms."""

    methods: MethodContext
    pools: dict[str, ClassSubset]
    episodes: dict[str, EpisodeList]
    to_input: Callable[[np.ndarray], torch.Tensor]
    l2sp_weights: list[float]
    swag_scales: list[float]
    bma: dict[str, int]


def regime_rows(
    regime: str, base: dict[str, Any], setting: Setting
) -> tuple[list[str], dict[str, dict[str, float]]]:
    """The table rows of one fine-tuning regime (described by ``regime``): each arm's choice on val,
    drift, accuracy, ECE after its val temperature, and paired difference against plain fine-tuning on
    the same test episodes; and those numbers per arm (``accuracy``, ``ece_pooled``, ``drift``,
    ``delta``, ``delta_ci95``; accuracies in percent)."""
    start = trainable_start(setting.methods.backbone, base, setting.methods)
    runs: dict[tuple[str, str], tuple[EpisodeResults, float]] = {}

    def scored(split: str, extra: dict[str, Any]) -> tuple[EpisodeResults, float]:
        """The arm ``base | extra`` on the split's episodes (run once): results and median drift."""
        key = (split, repr(sorted(extra.items())))
        if key not in runs:
            pool, episodes = setting.pools[split], setting.episodes[split]
            runs[key] = run_arm(
                {**base, **extra}, setting.methods, pool, episodes, setting.to_input, start, key[1]
            )
        return runs[key]

    rows: list[str] = []
    candidates = {"l2sp": [{"prior": "l2sp", "prior_weight": w} for w in setting.l2sp_weights]}
    if setting.methods.swag is not None:
        candidates["swag"] = [{"prior": "swag", "prior_scale": s} for s in setting.swag_scales]
    arms: dict[str, tuple[str, dict[str, Any]]] = {"none": ("—", {})}
    for prior, options in candidates.items():
        accuracy = {i: accuracy_or_nan(scored("val", extra)[0]) for i, extra in enumerate(options)}
        strength = {"l2sp": "prior_weight", "swag": "prior_scale"}[prior]
        listing = ", ".join(
            f"{options[i][strength]:g}: " + (f"{100 * a:.1f}" if np.isfinite(a) else "diverged")
            for i, a in accuracy.items()
        )
        finite = [i for i, a in accuracy.items() if np.isfinite(a)]
        if not finite:
            rows.append(f"| {regime} | {prior} | every candidate diverged ({listing}) | — | — | — | — |")
            continue
        best = max(finite, key=lambda i: (accuracy[i], -i))  # ties: the weaker prior (listed first)
        arms[prior] = (f"{options[best][strength]:g} ({listing})", options[best])
    arms["bma"] = ("—", setting.bma)
    numbers: dict[str, dict[str, float]] = {}
    reference = None
    for arm, (chosen, extra) in arms.items():
        (tested, drift), (calibration, _) = scored("test", extra), scored("val", extra)
        if tested.n_failed or calibration.n_failed:
            rows.append(
                f"| {regime} | {arm} | {chosen} | diverged on {tested.n_failed} of {len(tested)} test and "
                f"{calibration.n_failed} of {len(calibration)} val episodes | — | — | — |"
            )
            continue
        probabilities = softmax(calibrate_with_val_episodes(tested, calibration).logits)
        ece = pooled_ece(probabilities, tested.labels)[0]
        correct = tested.values("accuracy")
        reference = correct if reference is None else reference
        mean, half = tested.summary()["accuracy"]
        numbers[arm] = {"accuracy": 100 * mean, "ece_pooled": ece, "drift": drift}
        delta = "—"
        if arm != "none":
            difference, width = (100 * v for v in paired_difference_ci95(correct, reference))
            numbers[arm] |= {"delta": difference, "delta_ci95": width}
            delta = f"{difference:+.1f} ± {width:.1f}"
        rows.append(
            f"| {regime} | {arm} | {chosen} | {drift:.4f} | {100 * mean:.1f} ± {100 * half:.1f} "
            f"| {ece:.3f} | {delta} |"
        )
    return rows, numbers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("--from", dest="from_run", required=True, help="the run whose backbone is read")
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--episodes", type=int, default=30, help="the first N test episodes")
    parser.add_argument("--val-episodes", type=int, default=15, help="the first N val episodes")
    parser.add_argument("--l2sp-weights", type=float, nargs="+", default=[0.1, 1.0, 10.0])
    parser.add_argument("--swag-scales", type=float, nargs="+", default=[1.0, 1e2, 1e4, 1e6])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    config = load_config(args.config)
    context = backbone_stages(open_context(config), (), args.from_run)
    methods = context.method_context(None)
    pools = {split: context.data.subset(split, "novel") for split in ("val", "test")}
    lists = draw_episodes(config, pools, context.n_way, val=True)
    if args.shots not in lists.test:
        raise SystemExit(f"error: --shots {args.shots}: the config's episodes.shots are {sorted(lists.test)}")
    counts = {"test": 2, "val": 2} if args.quick else {"test": args.episodes, "val": args.val_episodes}
    chosen = {"test": lists.test[args.shots], "val": lists.val[args.shots]}
    episodes = {
        split: dataclasses.replace(listed, episodes=listed.episodes[: counts[split]])
        for split, listed in chosen.items()
    }
    spec = methods.spec

    def to_input(images: np.ndarray) -> torch.Tensor:
        return to_model_input(images, spec.mean, spec.std, spec.in_chans, methods.device)

    setting = Setting(
        methods,
        pools,
        episodes,
        to_input,
        args.l2sp_weights,
        args.swag_scales,
        QUICK_BMA if args.quick else BMA,
    )
    header = (
        f"{config.name}, {args.shots}-shot ({episodes['val'].k_shot}-shot val), first {counts['test']} test "
        f"and {counts['val']} val episodes, backbone of run {args.from_run}; SWAG posterior of "
        f"pretraining: {'yes' if context.swag else 'no'}\n\n"
        "| regime | arm | chosen on val (val accuracy, %) | median ‖θ - θ₀‖ / ‖θ₀‖ | accuracy "
        "| ECE pooled, val temperature | Δ accuracy vs none |\n|---|---|---|---|---|---|---|"
    )
    print(header, flush=True)
    lines = [header]
    tags = {
        "command": json.dumps({"config": str(args.config), "from": args.from_run, **vars(args)}, default=str)
    }
    with tracking.benchmark_run("prior-fair-test", tags=tags, settings=config.tracking):
        for key, (regime, base) in REGIMES.items():
            rows, numbers = regime_rows(regime, {**base, **(QUICK if args.quick else {})}, setting)
            print("\n".join(rows), flush=True)
            lines += rows
            tracking.log_metrics(
                {
                    names.benchmark_metric(config.name, args.shots, key, arm, name): value
                    for arm, values in numbers.items()
                    for name, value in values.items()
                }
            )
        lines.append(f"\n{time.perf_counter() - started:.0f} s")
        tracking.log_text_artifact("\n".join(lines) + "\n", "prior_fair_test.md")
    print(lines[-1])


if __name__ == "__main__":
    main()
