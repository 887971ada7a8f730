"""Robust training, a section of the robustness suite: does adversarial querying buy robustness?

From one pretrained backbone (the dataset's opened context: the ``--from`` run's, or the one the suite
trained), three arms train for the same budget of images and attack steps:

- **natural**: ProtoNet meta-training on clean episodes (Snell et al., 2017);
- **adversarial querying**: the same, with every episode's queries PGD-perturbed against the
  episode's prototypes (Goldblum, Fowl & Goldstein, NeurIPS 2020; ``meta_train.adversarial``);
- **adversarial fine-tuning**: supervised PGD adversarial training on the base classes (Madry et al.,
  ICLR 2018; ``fewshot_med.training.adversarial.adversarial_finetune``), one batch of an episode's size
  per episode of the other arms.

Each arm keeps its last weights (``keep: last``: clean val accuracy would pick the initial weights for
the adversarial arms). All three are scored on the same first ``EPISODES_PER_K`` test episodes per K by
a ProtoNet head on eval-mode features: clean accuracy, and robust accuracy under L∞ PGD (ε = 2/255,
10 steps, ``fewshot_med.robustness``) against the adapted model, with paired 95% CIs between arms over
the same episodes, and each arm's training wall time.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import numpy as np
import torch

from benchmarks.common import OpenedDataset, SuiteOptions
from fewshot_med.config import AdversarialConfig, MetaTrainConfig
from fewshot_med.data.episodes import Episode
from fewshot_med.data.roles import ClassSubset
from fewshot_med.evaluation.intervals import mean_ci95, paired_difference_ci95
from fewshot_med.methods.protonet import ProtoNet
from fewshot_med.models import BackboneSpec, embed
from fewshot_med.robustness.adapted import FeatureModel, adapt, unit_images
from fewshot_med.robustness.attacks import pgd
from fewshot_med.tracking import names
from fewshot_med.training.adversarial import adversarial_finetune
from fewshot_med.training.meta import meta_train

#: The arms, in table order; the first is the reference of the paired differences.
ARMS = ("natural", "adversarial_querying", "adversarial_finetune")
ARM_TITLES = {
    "natural": "natural meta-training (ProtoNet)",
    "adversarial_querying": "adversarial querying (ProtoNet)",
    "adversarial_finetune": "adversarial fine-tuning (Madry)",
}
#: The evaluation attack: L∞ PGD in pixel units of [0, 1] images.
EVAL_ATTACK = AdversarialConfig(epsilon=2 / 255, steps=10)
#: The training attack of both adversarial arms (fewer steps: it runs once per training episode).
TRAIN_ATTACK = AdversarialConfig(epsilon=2 / 255, steps=3)
SHOTS = (1, 5)
#: Training episodes (optimizer steps) per arm, and test episodes per K (all 15 queries per class
#: attacked with PGD-10): at 28 px on 2 CPU cores the three arms trained in 7.7 minutes.
TRAIN_EPISODES = 150
EPISODES_PER_K = 25
#: Queries per class of the training episodes.
TRAIN_QUERIES = 10
#: A smoke run: a few steps and episodes; its numbers mean nothing.
QUICK_TRAIN_EPISODES = 2
QUICK_EPISODES_PER_K = 3


@dataclass
class ArmResult:
    """One arm: its training wall time and, per K, per-episode clean and robust accuracy ``(E,)``."""

    seconds: float
    clean: dict[int, np.ndarray]
    robust: dict[int, np.ndarray]


def section(opened: OpenedDataset, options: SuiteOptions) -> tuple[str, dict[str, float]]:
    """Train the three arms from ``opened``'s backbone and score them on its test episodes.

    Returns:
        The markdown of the section (a ``###`` heading, the table, the paired differences) and the
        headline metrics ``<dataset>.<K>shot.robust_training.<arm>.{clean,robust}_accuracy``.
    """
    backbone, spec = opened.context.trained()
    data, config = opened.context.data, opened.lineage.config
    train_pool, val_pool = data.subset("train", "base"), data.subset("val", "novel")
    test_pool = opened.embedded.subsets["novel_test"]
    budget = QUICK_TRAIN_EPISODES if options.quick else TRAIN_EPISODES
    n_episodes = QUICK_EPISODES_PER_K if options.quick else EPISODES_PER_K
    settings = config.meta_train.model_copy(
        update={
            "algorithm": "protonet",
            "episodes": budget,
            "val_every": budget,
            "n_query": TRAIN_QUERIES,
            "keep": "last",
            "adversarial": None,
        }
    )
    device = opened.context.device
    trainers = {
        "natural": lambda model: meta_train(
            model, spec, train_pool, val_pool, settings, device, seed=options.seed
        ),
        "adversarial_querying": lambda model: meta_train(
            model,
            spec,
            train_pool,
            val_pool,
            settings.model_copy(update={"adversarial": TRAIN_ATTACK}),
            device,
            seed=options.seed,
        ),
        "adversarial_finetune": lambda model: adversarial_finetune(
            model,
            spec,
            train_pool,
            TRAIN_ATTACK,
            steps=budget,
            batch_size=_episode_images(settings, train_pool),
            device=device,
            lr=settings.lr,
            augment=settings.augment,
            seed=options.seed,
        ),
    }
    episodes = {k: opened.episodes.test[k].episodes[:n_episodes] for k in SHOTS if k in opened.episodes.test}
    results = {}
    for arm in ARMS:
        model = copy.deepcopy(backbone)
        started = time.perf_counter()
        trainers[arm](model)
        seconds = time.perf_counter() - started
        clean, robust = robust_accuracies(model.eval(), spec, test_pool, episodes, device, options.seed)
        results[arm] = ArmResult(seconds, clean, robust)
    return _markdown(opened.lineage.name, results, budget, opened.lineage.backbone_source), _metrics(
        opened.lineage.name, results
    )


def robust_accuracies(
    backbone: torch.nn.Module,
    spec: BackboneSpec,
    pool: ClassSubset,
    episodes: dict[int, tuple[Episode, ...]],
    device: torch.device,
    seed: int,
) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    """Per K, ``(E,)`` clean and robust query accuracy of a ProtoNet head fitted on each episode's clean
    eval-mode support features; robust: ``EVAL_ATTACK`` PGD on the queries against that adapted model,
    the random start seeded per episode from ``seed``."""
    features = FeatureModel(backbone, spec).to(device)
    positions = np.full(int(pool.indices.max()) + 1, -1, dtype=np.int64)
    positions[pool.indices] = np.arange(len(pool))
    embedded = embed(backbone, pool.images, spec, device)  # (N, D), clean support features
    clean: dict[int, np.ndarray] = {}
    robust: dict[int, np.ndarray] = {}
    for k, listed in episodes.items():
        clean[k], robust[k] = np.zeros(len(listed)), np.zeros(len(listed))
        for index, episode in enumerate(listed):
            support = embedded[positions[episode.support_rows()]].to(device)
            model = adapt(ProtoNet, features, support, torch.from_numpy(episode.support_labels()))
            queries = unit_images(pool.images[positions[episode.query_rows()]], device)
            labels = torch.from_numpy(episode.query_labels()).to(device)
            start = int(np.random.SeedSequence([seed, k, index]).generate_state(1)[0])
            attacked = pgd(model, queries, labels, EVAL_ATTACK.epsilon, EVAL_ATTACK.steps, seed=start)
            with torch.no_grad():
                clean[k][index] = (model(queries).argmax(dim=1) == labels).float().mean().item()
                robust[k][index] = (model(attacked).argmax(dim=1) == labels).float().mean().item()
    return clean, robust


def _episode_images(settings: MetaTrainConfig, pool: ClassSubset) -> int:
    """Images in one training episode: ``n_way · (k_shot + n_query)``, ``n_way`` all base classes if unset."""
    return (settings.n_way or len(pool.class_names)) * (settings.k_shot + settings.n_query)


def _metrics(dataset: str, results: dict[str, ArmResult]) -> dict[str, float]:
    """Headline metrics: per arm and K, clean and robust accuracy; per arm, training seconds."""
    metrics = {}
    for arm, result in results.items():
        for k in result.clean:
            for kind, values in (("clean", result.clean[k]), ("robust", result.robust[k])):
                metrics[names.benchmark_metric(dataset, k, "robust_training", arm, f"{kind}_accuracy")] = (
                    float(values.mean())
                )
        metrics[names.benchmark_value(dataset, "robust_training", arm, "train_seconds")] = result.seconds
    return metrics


def _markdown(dataset: str, results: dict[str, ArmResult], budget: int, backbone: str) -> str:
    """The section: per K and arm, clean and robust accuracy with 95% CIs and the paired differences
    against natural meta-training on the same episodes, and each arm's training time."""
    reference = results[ARMS[0]]
    shots = sorted(reference.clean)
    lines = [
        f"#### Robust training ({dataset})",
        "",
        f"Backbone {backbone}; each arm trains {budget} episodes/steps from it (training attack: PGD "
        f"ε = {TRAIN_ATTACK.epsilon * 255:.0f}/255, {TRAIN_ATTACK.steps} steps). Test: ProtoNet head on "
        f"the first {len(reference.clean[shots[0]])} test episodes per K; robust accuracy under PGD "
        f"ε = {EVAL_ATTACK.epsilon * 255:.0f}/255, {EVAL_ATTACK.steps} steps. Differences are paired "
        "over the same episodes, against natural meta-training (95% CI).",
        "",
        "| K | arm | clean acc. | robust acc. | Δ clean | Δ robust | train s |",
        "|---|---|---|---|---|---|---|",
    ]
    for k in shots:
        for arm, result in results.items():
            cells = [_interval(*mean_ci95(result.clean[k])), _interval(*mean_ci95(result.robust[k]))]
            if arm == ARMS[0]:
                cells += ["—", "—"]
            else:
                cells += [
                    _interval(*paired_difference_ci95(result.clean[k], reference.clean[k]), signed=True),
                    _interval(*paired_difference_ci95(result.robust[k], reference.robust[k]), signed=True),
                ]
            lines.append(f"| {k} | {ARM_TITLES[arm]} | {' | '.join(cells)} | {result.seconds:.0f} |")
    return "\n".join(lines)


def _interval(mean: float, half_width: float, signed: bool = False) -> str:
    """``0.712 ± 0.021`` (``+0.034 ± 0.010`` when ``signed``)."""
    return f"{mean:+.3f} ± {half_width:.3f}" if signed else f"{mean:.3f} ± {half_width:.3f}"
