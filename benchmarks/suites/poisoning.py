"""Poisoning, attack and defence: one section of the robustness suite, per dataset.

On the dataset's backbone features and saved test episodes (``benchmarks.common.OpenedDataset``):

1. **Support-set label flips.** In the first episodes of each K, ``round(rate · N·K)`` support labels
   are flipped (``flip_labels``; redrawn until every class keeps 2 labelled images, so every method and
   leave-one-out still sees every class). SimpleShot and the logistic-regression probe are scored clean,
   poisoned, and after removing the images each detector flags (never a class's last image: a class all
   of whose images are flagged keeps them). Detectors: deep k-NN (Peri et al., 2020) over the support
   set with ``k`` = images per class, and cleanlab's ``find_label_issues`` fed with leave-one-out
   probabilities of the probe within the support set. A support-plus-base-images reference set, the
   other choice, is scored as a third detector: base-class neighbours outvote the rare classes.
2. **Base-class label flips** (a proxy for poisoned pretraining data): the backbone is trained further
   for the same short budget on the base-class train images with clean labels and with labels flipped
   at each rate (same seed, so the same batches and head), and the novel K-shot accuracy of the probe is
   compared, paired over episodes. Detection on a sample of the base data uses the audit's settings.
3. **Feature collision** (Shafahi et al., 2018): per target query, one poison crafted from the
   novel-class train image of another class of its episode nearest the target, stored as 8-bit pixels
   and inserted into the support set with its clean label; attack success is the target classified as
   the poison's class (against inserting the unperturbed base image), with detector recall on the poison.

Genuine rare-class outliers: a clean support image whose CL2N feature is farther from its class's
centroid (over all the test pool's images of that class) than ``OUTLIER_QUANTILE`` of that class's
images. A detector's false-flag rate on them says what it costs on atypical but correct cases.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.common import OpenedDataset, SuiteOptions
from fewshot_med.audit.labels import LabelSettings
from fewshot_med.config import SwagConfig
from fewshot_med.data import ClassSubset, EpisodeList
from fewshot_med.evaluation import softmax
from fewshot_med.evaluation.intervals import mean_ci95, paired_difference_ci95
from fewshot_med.evaluation.runner import leave_one_out_logits
from fewshot_med.methods import MethodContext, create_method
from fewshot_med.models import embed
from fewshot_med.robustness.label_issues import (
    confident_learning_issues,
    knn_disagreement,
    out_of_fold_probabilities,
    standardise,
)
from fewshot_med.robustness.poisoning import deep_knn_flags, feature_collision_poison, flip_labels
from fewshot_med.tracking import names
from fewshot_med.training.pretrain import pretrain

#: The frozen-feature methods scored (the probe with its default l2 features).
METHODS = ("simpleshot", "logreg")
#: Support flip rates (0: what removing flagged images costs on a clean support set) and shots.
SUPPORT_RATES = (0.0, 0.1, 0.2, 0.4)
SUPPORT_SHOTS = (5, 10)
#: Test episodes per K (the first of the saved list), full and quick.
EPISODES, QUICK_EPISODES = 200, 12
#: Base-class flip rates and the further-training budget (steps of the config's batch size, constant lr).
BASE_RATES, QUICK_BASE_RATES = (0.2, 0.4), (0.4,)
BASE_STEPS, QUICK_BASE_STEPS = 40, 2
BASE_LR = 2e-4
#: Base-class images (a stratified-random sample) the detectors examine.
BASE_DETECTION, QUICK_BASE_DETECTION = 1500, 200
#: Feature collision: targets (first episodes of K = 5), forward-backward steps and step size.
COLLISION_SHOTS = 5
TARGETS, QUICK_TARGETS = 50, 4
COLLISION_STEPS, QUICK_COLLISION_STEPS = 60, 5
COLLISION_LR = 0.01
#: Shafahi et al.'s β₀ (their β = β₀ · 2048² / dim(b)², scaled here by the feature dimension).
COLLISION_BETA0 = 0.25
#: Images in the support+base reference variant: per base class.
BASE_REFERENCE_PER_CLASS = 10
#: A clean image beyond this quantile of its class's centroid distances is a genuine outlier.
OUTLIER_QUANTILE = 0.9
#: Detectors: table name -> metric-key part.
DETECTORS = {
    "deep k-NN": "deep_knn",
    "cleanlab": "cleanlab",
    "deep k-NN, support + base": "deep_knn_base_ref",
}


@dataclass
class Support:
    """Episodes as arrays: support ``(E, n, D)`` and labels ``(E, n)``, queries ``(E, q, D)`` and
    labels, and ``(E, n)`` genuine-outlier flags of the support images."""

    support: torch.Tensor
    labels: np.ndarray
    query: torch.Tensor
    query_labels: np.ndarray
    outlier: np.ndarray


def section(opened: OpenedDataset, options: SuiteOptions) -> tuple[str, dict[str, float]]:
    """The poisoning study on one opened dataset: markdown tables and headline metrics."""
    start = time.perf_counter()
    name = opened.lineage.name
    features, subsets = opened.embedded.features, opened.embedded.subsets
    context = opened.embedded.methods
    pool = subsets["novel_test"]
    outliers = genuine_outliers(cl2n(features["novel_test"], context), pool.labels)
    lines = [f"#### Poisoning, attack and defence ({name})", ""]
    if options.quick:
        lines += ["**Quick mode: few episodes and steps; these numbers mean nothing.**", ""]
    metrics: dict[str, float] = {}
    n_episodes = QUICK_EPISODES if options.quick else EPISODES
    flips = []
    usable = sorted(k for k in opened.episodes.test if k >= 2)  # cleanlab's leave-one-out needs 2 a class
    for k in [k for k in SUPPORT_SHOTS if k in usable] or usable[:1]:
        episodes = _first(opened.episodes.test[k], n_episodes)
        data = _support(features["novel_test"], pool, episodes, outliers)
        flips.append((k, support_flips(data, context, _base_reference(opened, options.seed), options.seed)))
    lines += (
        _flip_tables(flips) if flips else ["Support-set flips not run: they need episodes of K >= 2.", ""]
    )
    metrics |= _flip_metrics(name, flips)
    base = base_flips(opened, options)
    lines += _base_tables(base)
    metrics |= _base_metrics(name, base)
    if usable:
        k = COLLISION_SHOTS if COLLISION_SHOTS in usable else usable[0]
        episodes = _first(opened.episodes.test[k], QUICK_TARGETS if options.quick else TARGETS)
        data = _support(features["novel_test"], pool, episodes, outliers)
        collision = feature_collision(opened, data, episodes, options)
        lines += _collision_tables(collision, k)
        metrics |= _collision_metrics(name, k, collision)
    else:
        lines += ["Feature collision not run: it needs episodes of K >= 2.", ""]
    lines += [f"Wall time of this section: {time.perf_counter() - start:.0f} s.", ""]
    return "\n".join(lines), metrics


# ----------------------------------------------------------------------------------------------------
# Shared pieces


def cl2n(features: torch.Tensor, context: MethodContext) -> np.ndarray:
    """``(N, D)`` features centred on the base-class mean and L2-normalised (SimpleShot's CL2N), float64."""
    centred = features.float() - context.base_feature_mean.float()
    return F.normalize(centred, dim=-1).double().numpy()


def genuine_outliers(features: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``(N,)`` bool: farther from the centroid of its class (over all ``N`` images) than the
    ``OUTLIER_QUANTILE`` of that class's distances."""
    outlier = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        distance = np.linalg.norm(features[members] - features[members].mean(axis=0), axis=1)
        outlier[members] = distance > np.quantile(distance, OUTLIER_QUANTILE)
    return outlier


def _first(episodes: EpisodeList, n: int) -> EpisodeList:
    return dataclasses.replace(episodes, episodes=episodes.episodes[:n])


def _positions(pool: ClassSubset, rows: np.ndarray) -> np.ndarray:
    """Pool positions of split rows (the episodes were drawn from ``pool``)."""
    lookup = np.full(int(max(pool.indices.max(), rows.max())) + 1, -1)
    lookup[pool.indices] = np.arange(len(pool))
    return lookup[rows]


def _support(
    features: torch.Tensor, pool: ClassSubset, episodes: EpisodeList, outliers: np.ndarray
) -> Support:
    arrays = episodes.arrays
    support, query = _positions(pool, arrays.support_rows), _positions(pool, arrays.query_rows)
    return Support(
        features[support], arrays.support_labels, features[query], arrays.query_labels, outliers[support]
    )


def _method(name: str, context: MethodContext):
    return create_method(name, context)


def _accuracy(name: str, context: MethodContext, support, labels, query, query_labels) -> np.ndarray:
    """``(E,)`` accuracy of one batched fit per episode."""
    logits = _method(name, context).fit(support, torch.as_tensor(labels)).predict_logits(query)
    return (logits.argmax(-1).numpy() == query_labels).mean(axis=-1)


def _accuracy_after_removal(
    name: str, context: MethodContext, data: Support, labels: np.ndarray, flags: np.ndarray
) -> np.ndarray:
    """``(E,)`` accuracy after dropping flagged support images (a class all flagged keeps them)."""
    accuracy = np.empty(len(labels))
    for e, (row, flagged) in enumerate(zip(labels, flags, strict=True)):
        keep = ~flagged | np.isin(row, [c for c in np.unique(row) if flagged[row == c].all()])
        accuracy[e] = _accuracy(
            name,
            context,
            data.support[e][keep][None],
            row[keep][None],
            data.query[e][None],
            data.query_labels[e][None],
        )[0]
    return accuracy


def _probe_loo(context: MethodContext, support: torch.Tensor, labels: np.ndarray) -> np.ndarray:
    """``(E, n, n_way)`` leave-one-out probabilities of the probe within each support set."""
    return softmax(leave_one_out_logits(lambda: _method("logreg", context), support, labels))


def detect(
    context: MethodContext, support: torch.Tensor, labels: np.ndarray, reference: tuple
) -> dict[str, np.ndarray]:
    """``(E, n)`` flags of every detector of ``DETECTORS`` on each support set.

    ``reference``: ``(m, D)`` CL2N base-class features and their ``(m,)`` labels (the third detector's
    extra neighbours, labelled after the ``n_way`` support classes)."""
    x = np.stack([cl2n(s, context) for s in support])
    probabilities = _probe_loo(context, support, labels)
    flags = {d: np.zeros(labels.shape, dtype=bool) for d in DETECTORS}
    base_x, base_y = reference
    n_way = int(labels.max()) + 1
    for e, row in enumerate(labels):
        flags["deep k-NN"][e] = deep_knn_flags(x[e], row)[0]
        flags["cleanlab"][e, confident_learning_issues(row, probabilities[e])] = True
        joint = np.concatenate([row, base_y + n_way])
        plurality, _, _ = knn_disagreement(np.concatenate([x[e], base_x]), joint, int(np.bincount(row).max()))
        flags["deep k-NN, support + base"][e] = (plurality != joint)[: len(row)]
    return flags


def detection_scores(flags: np.ndarray, truth: np.ndarray, outlier: np.ndarray) -> dict[str, float]:
    """Precision and recall of ``flags`` against ``truth`` (pooled over episodes), and the false-flag
    rates on clean genuine outliers and on the other clean images."""
    clean_outlier, typical = outlier & ~truth, ~outlier & ~truth
    flagged = flags.sum()
    return {
        "precision": float((flags & truth).sum() / flagged) if flagged else float("nan"),
        "recall": float((flags & truth).sum() / truth.sum()) if truth.any() else float("nan"),
        "outlier_false_flags": float(flags[clean_outlier].mean()) if clean_outlier.any() else float("nan"),
        "typical_false_flags": float(flags[typical].mean()) if typical.any() else float("nan"),
        "flagged_per_episode": float(flags.sum(axis=-1).mean()),
    }


def _base_reference(opened: OpenedDataset, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``BASE_REFERENCE_PER_CLASS`` random base-class train images per class: CL2N features, labels."""
    labels = opened.embedded.subsets["base_train"].labels
    rng = np.random.default_rng(seed)
    rows = np.concatenate(
        [
            rng.choice(
                np.flatnonzero(labels == c), min(BASE_REFERENCE_PER_CLASS, (labels == c).sum()), replace=False
            )
            for c in np.unique(labels)
        ]
    )
    return cl2n(opened.embedded.features["base_train"][rows], opened.embedded.methods), labels[rows]


# ----------------------------------------------------------------------------------------------------
# 1. Support-set label flips


@dataclass
class FlipResult:
    """One (K, rate): per method the ``(E,)`` accuracies clean, poisoned and after each detector's
    removal, and per detector its ``detection_scores``."""

    rate: float
    accuracy: dict[str, dict[str, np.ndarray]]
    detection: dict[str, dict[str, float]]


def _flip_episodes(
    labels: np.ndarray, rate: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """``flip_labels`` per episode, redrawn until every class keeps at least 2 labelled images."""
    n_way = int(labels.max()) + 1
    flipped, masks = np.empty_like(labels), np.zeros(labels.shape, dtype=bool)
    for e, row in enumerate(labels):
        while True:
            flipped[e], masks[e] = flip_labels(row, rate, n_way, rng)
            if np.bincount(flipped[e], minlength=n_way).min() >= 2:
                break
    return flipped, masks


def support_flips(
    data: Support, context: MethodContext, reference: tuple[np.ndarray, np.ndarray], seed: int
) -> list[FlipResult]:
    """Every rate of ``SUPPORT_RATES`` on these episodes (flips seeded by ``seed``, K and the rate)."""
    clean = {
        m: _accuracy(m, context, data.support, data.labels, data.query, data.query_labels) for m in METHODS
    }
    results = []
    for rate in SUPPORT_RATES:
        rng = np.random.default_rng([seed, data.labels.shape[1], round(100 * rate)])
        labels, truth = _flip_episodes(data.labels, rate, rng)
        flags = detect(context, data.support, labels, reference)
        accuracy = {}
        for method in METHODS:
            accuracy[method] = {
                "clean": clean[method],
                "poisoned": _accuracy(method, context, data.support, labels, data.query, data.query_labels),
            }
            for detector in DETECTORS:
                accuracy[method][detector] = _accuracy_after_removal(
                    method, context, data, labels, flags[detector]
                )
        detection = {d: detection_scores(f, truth, data.outlier) for d, f in flags.items()}
        results.append(FlipResult(rate, accuracy, detection))
    return results


# ----------------------------------------------------------------------------------------------------
# 2. Base-class label flips (proxy: further training of the backbone)


@dataclass
class BaseResult:
    """Novel K-shot accuracy of the probe per arm (``original``, ``clean``, ``rate<r>``) over the same
    episodes, detection scores per rate and detector, and what the proxy ran with."""

    k: int
    accuracy: dict[str, np.ndarray]
    detection: dict[float, dict[str, dict[str, float]]]
    steps: int
    batch_size: int
    seconds: float


def _train_further(opened: OpenedDataset, labels: np.ndarray, steps: int, seed: int) -> torch.nn.Module:
    """A copy of the backbone trained ``steps`` more batches on the base train images with ``labels``
    (constant ``BASE_LR``, a fresh head, the last step kept)."""
    context = opened.context
    backbone, spec = context.trained()
    settings = context.config.pretrain.model_copy(
        update={
            "epochs": 1,
            "steps_per_epoch": steps,
            "warmup_epochs": 0,
            "schedule": "constant",
            "lr": BASE_LR,
            "keep": "last",
            "early_stopping_patience": None,
            "swag": SwagConfig(),
        }
    )
    train = dataclasses.replace(context.data.subset("train", "base"), labels=labels)
    result = pretrain(
        copy.deepcopy(backbone),
        spec,
        train,
        context.data.subset("val", "base"),
        settings,
        context.device,
        seed=seed,
    )
    return result.backbone


def base_flips(opened: OpenedDataset, options: SuiteOptions) -> BaseResult:
    """The further-training proxy at every base flip rate, and detection on a base-class sample."""
    start = time.perf_counter()
    context, embedded = opened.context, opened.embedded
    rates = QUICK_BASE_RATES if options.quick else BASE_RATES
    steps = QUICK_BASE_STEPS if options.quick else BASE_STEPS
    k = 5 if 5 in opened.episodes.test else min(opened.episodes.test)
    episodes = _first(opened.episodes.test[k], QUICK_EPISODES if options.quick else EPISODES)
    pool = embedded.subsets["novel_test"]
    train_labels = context.data.subset("train", "base").labels
    n_base = int(train_labels.max()) + 1
    methods = embedded.methods

    def probe(features: torch.Tensor) -> np.ndarray:
        data = _support(features, pool, episodes, np.zeros(len(pool), dtype=bool))
        return _accuracy("logreg", methods, data.support, data.labels, data.query, data.query_labels)

    _, spec = context.trained()
    batch = context.config.evaluation.batch_size
    arms = {"original": embedded.features["novel_test"], "clean": None}
    arms |= {f"rate{r}": None for r in rates}
    accuracy = {}
    for arm in arms:
        if arm == "original":
            accuracy[arm] = probe(arms[arm])
            continue
        rate = 0.0 if arm == "clean" else float(arm.removeprefix("rate"))
        labels, _ = flip_labels(
            train_labels, rate, n_base, np.random.default_rng([options.seed, round(100 * rate)])
        )
        backbone = _train_further(opened, labels, steps, options.seed)
        accuracy[arm] = probe(embed(backbone, pool.images, spec, context.device, batch))
    detection = {}
    limit = QUICK_BASE_DETECTION if options.quick else BASE_DETECTION
    rng = np.random.default_rng(options.seed)
    rows = np.sort(rng.choice(len(train_labels), min(limit, len(train_labels)), replace=False))
    x = standardise(embedded.features["base_train"][rows].double().numpy())
    settings = LabelSettings()
    for rate in rates:
        labels, truth = flip_labels(
            train_labels[rows], rate, n_base, np.random.default_rng([options.seed, 1, round(100 * rate)])
        )
        plurality, _, _ = knn_disagreement(x, labels, settings.neighbours)
        folds = min(settings.folds, int(np.bincount(labels, minlength=n_base).min()))
        probabilities = out_of_fold_probabilities(x, labels, folds, settings.seed)
        cleanlab = np.zeros(len(labels), dtype=bool)
        cleanlab[confident_learning_issues(labels, probabilities)] = True
        no_outliers = np.zeros(len(labels), dtype=bool)
        detection[rate] = {
            "deep k-NN": detection_scores(plurality != labels, truth, no_outliers),
            "cleanlab": detection_scores(cleanlab, truth, no_outliers),
        }
    batch_size = min(context.config.pretrain.batch_size, len(train_labels))
    return BaseResult(k, accuracy, detection, steps, batch_size, time.perf_counter() - start)


# ----------------------------------------------------------------------------------------------------
# 3. Feature collision


@dataclass
class CollisionResult:
    """Per method the ``(T,)`` 0/1 outcome "target classified as the poison's class" with the clean
    support, the unperturbed base image inserted, the poison inserted, and the poison inserted then
    each detector's flags removed; per detector its recall on the poison and false-flag rates; the
    feature distance to the target (base, poison) and the poison's L∞ change, in 8-bit steps."""

    outcome: dict[str, dict[str, np.ndarray]]
    detection: dict[str, dict[str, float]]
    distance_ratio: float
    linf: float
    seconds: float


def _unit_images(images: np.ndarray) -> torch.Tensor:
    """``(N, H, W, C)`` uint8 -> ``(N, C, H, W)`` float in ``[0, 1]``."""
    return torch.as_tensor(images).permute(0, 3, 1, 2).float().div(255)


def _pixel_backbone(opened: OpenedDataset) -> Callable[[torch.Tensor], torch.Tensor]:
    """The backbone on ``[0, 1]`` images (normalising as ``to_model_input`` does), eval mode."""
    trained, spec = opened.context.trained()
    backbone = copy.deepcopy(trained).eval()  # a copy: the weights may be inference tensors, no backward
    device = opened.context.device
    mean = torch.tensor(spec.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, device=device).view(1, -1, 1, 1)

    def features(images: torch.Tensor) -> torch.Tensor:
        batch = (images.to(device) - mean) / std
        if batch.shape[1] != spec.in_chans:
            batch = (
                batch.mean(dim=1, keepdim=True)
                if spec.in_chans == 1
                else batch.expand(-1, spec.in_chans, -1, -1)
            )
        return backbone(batch).float()

    return features


def feature_collision(
    opened: OpenedDataset, data: Support, episodes: EpisodeList, options: SuiteOptions
) -> CollisionResult:
    """One poison per episode: target = the first query of episode class 0, poison class = episode
    class 1, base image = the novel train image of that class nearest the target (CL2N)."""
    start = time.perf_counter()
    embedded, methods = opened.embedded, opened.embedded.methods
    pool, train = embedded.subsets["novel_test"], embedded.subsets["novel_train"]
    arrays = episodes.arrays
    first_query = np.argmax(arrays.query_labels == 0, axis=1)
    target_rows = _positions(pool, arrays.query_rows[np.arange(len(arrays.query_rows)), first_query])
    train_x = cl2n(embedded.features["novel_train"], methods)
    target_x = cl2n(embedded.features["novel_test"][target_rows], methods)
    class_of = {name: i for i, name in enumerate(train.class_names)}
    base_rows = np.empty(len(target_rows), dtype=np.int64)
    for e, classes in enumerate(arrays.classes):
        members = np.flatnonzero(train.labels == class_of[classes[1]])
        base_rows[e] = members[np.argmin(np.linalg.norm(train_x[members] - target_x[e], axis=1))]
    backbone = _pixel_backbone(opened)
    base, target = _unit_images(train.images[base_rows]), _unit_images(pool.images[target_rows])
    dim = embedded.features["novel_test"].shape[1]
    beta = COLLISION_BETA0 * (dim / base[0].numel()) ** 2
    steps = QUICK_COLLISION_STEPS if options.quick else COLLISION_STEPS
    poison = feature_collision_poison(backbone, base, target, beta, steps, COLLISION_LR)
    poison = poison.mul(255).round().div(255)  # stored as an 8-bit image
    with torch.no_grad():
        f_base, f_poison, f_target = (backbone(x).cpu() for x in (base, poison, target))
    ratio = float(((f_poison - f_target).norm(dim=1) / (f_base - f_target).norm(dim=1)).median())
    n = data.labels.shape[1]
    inserted = {"base inserted": f_base, "poison inserted": f_poison}
    labels = np.concatenate([data.labels, np.ones((len(data.labels), 1), dtype=data.labels.dtype)], axis=1)
    query = embedded.features["novel_test"][target_rows][:, None]

    outcome: dict[str, dict[str, np.ndarray]] = {}
    for method in METHODS:
        outcome[method] = {
            "clean support": _predicted_as(method, methods, data.support, data.labels, query),
        }
        for label, extra in inserted.items():
            support = torch.cat([data.support, extra[:, None]], dim=1)
            outcome[method][label] = _predicted_as(method, methods, support, labels, query)
    support = torch.cat([data.support, f_poison[:, None]], dim=1)
    flags = detect(methods, support, labels, _base_reference(opened, options.seed))
    truth = np.zeros(labels.shape, dtype=bool)
    truth[:, n] = True
    outlier = np.concatenate([data.outlier, np.zeros((len(labels), 1), dtype=bool)], axis=1)
    detection = {d: detection_scores(f, truth, outlier) for d, f in flags.items()}
    for method in METHODS:
        for detector, flagged in flags.items():
            kept = Support(support, labels, query, np.ones((len(labels), 1), dtype=np.int64), outlier)
            outcome[method][f"poison, {detector} removal"] = _accuracy_after_removal(
                method, methods, kept, labels, flagged
            )
    linf = float((poison - base).abs().amax(dim=(1, 2, 3)).median() * 255)
    return CollisionResult(outcome, detection, ratio, linf, time.perf_counter() - start)


def _predicted_as(method: str, context: MethodContext, support, labels, query) -> np.ndarray:
    """``(E,)`` 1 where the episode's single query is classified as episode class 1."""
    logits = _method(method, context).fit(support, torch.as_tensor(labels)).predict_logits(query)
    return (logits.argmax(-1).numpy()[:, 0] == 1).astype(float)


# ----------------------------------------------------------------------------------------------------
# Tables and headline metrics


def _cell(values: np.ndarray) -> str:
    mean, half = mean_ci95(values)
    return f"{100 * mean:.1f} ± {100 * half:.1f}"


def _paired(a: np.ndarray, b: np.ndarray) -> str:
    mean, half = paired_difference_ci95(a, b)
    return f"{100 * mean:+.1f} ± {100 * half:.1f}"


def _share(value: float) -> str:
    return "—" if not np.isfinite(value) else f"{100 * value:.0f}%"


def _flip_tables(flips: list[tuple[int, list[FlipResult]]]) -> list[str]:
    lines = [
        "##### Support-set label flips: accuracy",
        "",
        "Mean test accuracy (%) ± 95% CI over episodes; Δ are paired over the same episodes "
        "(poisoned - clean; after removal - poisoned: the accuracy the defence recovers).",
        "",
        "| K | flip rate | method | clean | poisoned | Δ poisoned | "
        + " | ".join(f"{d} removal | Δ recovered" for d in DETECTORS)
        + " |",
        "|---|---|---|---|---|---|" + "---|---|" * len(DETECTORS),
    ]
    for k, results in flips:
        for result in results:
            for method, acc in result.accuracy.items():
                cells = " | ".join(f"{_cell(acc[d])} | {_paired(acc[d], acc['poisoned'])}" for d in DETECTORS)
                lines.append(
                    f"| {k} | {result.rate:.1f} | {method} | {_cell(acc['clean'])} "
                    f"| {_cell(acc['poisoned'])} | {_paired(acc['poisoned'], acc['clean'])} | {cells} |"
                )
    lines += [
        "",
        "##### Support-set label flips: detection",
        "",
        "Pooled over episodes. Outlier false flags: share of clean genuine rare-class outliers flagged "
        f"(farther from their class centroid than {OUTLIER_QUANTILE:.0%} of the class's test images); "
        "typical: the other clean support images.",
        "",
        "| K | flip rate | detector | precision | recall | outlier false flags | typical false flags "
        "| flagged per episode |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for k, results in flips:
        for result in results:
            for detector, s in result.detection.items():
                lines.append(
                    f"| {k} | {result.rate:.1f} | {detector} | {_share(s['precision'])} "
                    f"| {_share(s['recall'])} | {_share(s['outlier_false_flags'])} "
                    f"| {_share(s['typical_false_flags'])} | {s['flagged_per_episode']:.1f} |"
                )
    return [*lines, ""]


def _base_tables(base: BaseResult) -> list[str]:
    clean = base.accuracy["clean"]
    lines = [
        "##### Base-class label flips (proxy)",
        "",
        f"**A proxy, not poisoned pretraining:** the backbone was trained {base.steps} more steps of "
        f"{base.batch_size} base-class train images (constant lr {BASE_LR}, a fresh head, same seed) with "
        "clean labels and with labels flipped at each rate; the table gives the probe's novel "
        f"{base.k}-shot accuracy (%) with its paired difference against the clean-label arm. "
        f"{base.seconds:.0f} s.",
        "",
        "| backbone | accuracy | Δ vs clean-label further training |",
        "|---|---|---|",
    ]
    for arm, acc in base.accuracy.items():
        delta = "—" if arm == "clean" else _paired(acc, clean)
        lines.append(f"| {arm} | {_cell(acc)} | {delta} |")
    lines += [
        "",
        "Detection on a random sample of base-class train images, the audit's settings (deep k-NN with "
        f"k = {LabelSettings().neighbours}; cleanlab on {LabelSettings().folds}-fold logistic regression):",
        "",
        "| flip rate | detector | precision | recall | flagged |",
        "|---|---|---|---|---|",
    ]
    for rate, scores in base.detection.items():
        for detector, s in scores.items():
            lines.append(
                f"| {rate:.1f} | {detector} | {_share(s['precision'])} | {_share(s['recall'])} "
                f"| {s['flagged_per_episode']:.0f} |"
            )
    return [*lines, ""]


def _collision_tables(collision: CollisionResult, k: int) -> list[str]:
    some = next(iter(collision.outcome.values()))
    n = len(next(iter(some.values())))
    lines = [
        f"##### Feature collision (Poison Frogs), K = {k}, {n} targets",
        "",
        "Share (%) ± 95% CI of targets classified as the poison's class. The poison's features moved to "
        f"{collision.distance_ratio:.2f}x the base image's distance from the target (median); median L∞ "
        f"change {collision.linf:.0f}/255. {collision.seconds:.0f} s.",
        "",
        "| method | " + " | ".join(some) + " |",
        "|---|" + "---|" * len(some),
    ]
    for method, outcome in collision.outcome.items():
        lines.append(f"| {method} | " + " | ".join(_cell(v) for v in outcome.values()) + " |")
    lines += [
        "",
        "| detector | recall on the poison | outlier false flags | typical false flags |",
        "|---|---|---|---|",
    ]
    for detector, s in collision.detection.items():
        lines.append(
            f"| {detector} | {_share(s['recall'])} | {_share(s['outlier_false_flags'])} "
            f"| {_share(s['typical_false_flags'])} |"
        )
    return [*lines, ""]


def _flip_metrics(dataset: str, flips: list[tuple[int, list[FlipResult]]]) -> dict[str, float]:
    metrics = {}
    for k, results in flips:
        for result in results:
            parts = (names.shot(k), f"rate{result.rate}")
            acc = result.accuracy["logreg"]
            for arm in ("clean", "poisoned", *DETECTORS):
                part = DETECTORS.get(arm, arm)
                key = names.poisoning_metric(dataset, names.SUPPORT_FLIPS, *parts, "logreg", part, "accuracy")
                metrics[key] = mean_ci95(acc[arm])[0]
            for detector, scores in result.detection.items():
                for field in ("precision", "recall", "outlier_false_flags"):
                    key = names.poisoning_metric(
                        dataset, names.SUPPORT_FLIPS, *parts, DETECTORS[detector], field
                    )
                    metrics[key] = scores[field]
    return metrics


def _base_metrics(dataset: str, base: BaseResult) -> dict[str, float]:
    metrics = {}
    for arm, acc in base.accuracy.items():
        if arm.startswith("rate"):
            mean, half = paired_difference_ci95(acc, base.accuracy["clean"])
            key = names.poisoning_metric(dataset, names.BASE_FLIPS, names.shot(base.k), arm, "delta_accuracy")
            metrics |= {key: mean, names.ci95(key): half}
    for rate, scores in base.detection.items():
        for detector, s in scores.items():
            for field in ("precision", "recall"):
                metrics[names.poisoning_metric(dataset, names.BASE_FLIPS, f"rate{rate}", detector, field)] = (
                    s[field]
                )
    return metrics


def _collision_metrics(dataset: str, k: int, collision: CollisionResult) -> dict[str, float]:
    metrics = {}
    for method, outcome in collision.outcome.items():
        for arm, values in outcome.items():
            key = names.poisoning_metric(
                dataset, names.FEATURE_COLLISION, names.shot(k), method, arm, "success"
            )
            mean, half = mean_ci95(values)
            metrics |= {key: mean, names.ci95(key): half}
    for detector, s in collision.detection.items():
        for field in ("recall", "outlier_false_flags"):
            metrics[
                names.poisoning_metric(dataset, names.FEATURE_COLLISION, names.shot(k), detector, field)
            ] = s[field]
    return metrics
