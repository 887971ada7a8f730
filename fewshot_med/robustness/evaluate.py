"""Attack adapted few-shot models over fixed episodes: query attacks (PGD, FGSM) and the support-set attack.

Every episode's method is fitted on its clean support features (``adapt``); the attacks perturb the
episode's query images within an L∞ ball (pixel units, images in ``[0, 1]``) to maximise the
cross-entropy of the adapted pipeline, gradients through backbone and head. The support-set attack,
which few-shot adds, perturbs one support image to flip one correctly classified query (the head
re-fitted differentiably on every step, ``SupportAttackModel``). Numbers are per episode, so their
95% intervals are over episodes like every other evaluation of the toolkit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from fewshot_med.data import ClassSubset, EpisodeList
from fewshot_med.errors import DataError
from fewshot_med.evaluation.intervals import mean_ci95, paired_difference_ci95
from fewshot_med.evaluation.metrics import pooled_ece, softmax
from fewshot_med.robustness.adapted import FeatureModel, MethodFactory, SupportAttackModel, adapt
from fewshot_med.robustness.attacks import fgsm, pgd

#: Name of the unattacked row.
CLEAN = "clean"
#: Most query images one attack call perturbs: the query attacks of several episodes run as one batch
#: (``AdaptedModel`` fitted on all of them), which on 2 CPU cores is several times faster than one
#: small batch per episode and gives each image the same attack.
ATTACK_BATCH_IMAGES = 128


@dataclass(frozen=True)
class Attack:
    """One evasion attack setting: ``kind`` ``pgd`` (``steps`` steps, random start) or ``fgsm``, at L∞
    budget ``epsilon`` in pixel units."""

    kind: str
    epsilon: float
    steps: int = 1

    @property
    def label(self) -> str:
        """``pgd10 8/255``, ``fgsm 2/255``."""
        name = f"pgd{self.steps}" if self.kind == "pgd" else self.kind
        return f"{name} {epsilon_label(self.epsilon)}"

    @property
    def key(self) -> str:
        """MLflow-safe name: ``pgd10_eps8``, ``fgsm_eps2``."""
        name = f"pgd{self.steps}" if self.kind == "pgd" else self.kind
        return f"{name}_eps{epsilon_label(self.epsilon).split('/')[0]}"

    def run(self, model: torch.nn.Module, images: Tensor, labels: Tensor, seed: int) -> Tensor:
        """Adversarial ``(B, C, H, W)`` images for ``(B, C, H, W)`` clean ones and ``(B,)`` labels."""
        if self.kind == "fgsm":
            return fgsm(model, images, labels, self.epsilon)
        return pgd(model, images, labels, self.epsilon, self.steps, seed=seed)


def epsilon_label(epsilon: float) -> str:
    """``8/255`` for ``8 / 255`` (budgets are whole grey levels)."""
    return f"{round(epsilon * 255)}/255"


@dataclass(frozen=True)
class RobustnessSettings:
    """What the attacks cover.

    Attributes:
        epsilons: L∞ budgets in pixel units (images in ``[0, 1]``).
        steps: PGD step counts run at every budget (random start, step ``2.5 ε / steps``).
        check_epsilon: the gradient-masking check's large budget (PGD with the fewest steps).
        episodes: test episodes attacked per K (the first of the saved list).
        queries_per_class: queries of each class attacked per episode (the first of each class).
        support_targets: correctly classified queries per episode the support-set attack targets.
        seed: seed of the random starts and of the choice of targets.
    """

    epsilons: tuple[float, ...] = (1 / 255, 2 / 255, 4 / 255, 8 / 255)
    steps: tuple[int, ...] = (10, 50)
    check_epsilon: float = 32 / 255
    episodes: int = 40
    queries_per_class: int = 1
    support_targets: int = 3
    seed: int = 0

    def attacks(self) -> list[Attack]:
        """FGSM and PGD with every step count at every budget, then the check budget."""
        grid = [Attack("fgsm", eps) for eps in self.epsilons]
        grid += [Attack("pgd", eps, steps) for steps in self.steps for eps in self.epsilons]
        return [*grid, Attack("pgd", self.check_epsilon, min(self.steps))]


@dataclass
class AttackResults:
    """One method, K and attack (or ``CLEAN``) over the attacked episodes.

    Attributes:
        probs: ``(E, n, n_way)`` probabilities of the ``n`` attacked queries of each episode.
        labels: ``(E, n)`` their true classes.
    """

    method: str
    k_shot: int
    attack: Attack | None
    probs: np.ndarray
    labels: np.ndarray

    @property
    def name(self) -> str:
        return CLEAN if self.attack is None else self.attack.label

    def accuracy(self) -> np.ndarray:
        """``(E,)`` per-episode accuracy."""
        return (self.probs.argmax(axis=-1) == self.labels).mean(axis=1)

    def summary(self) -> dict[str, tuple[float, float]]:
        """Accuracy and pooled ECE (Guo et al., 2017; bootstrap over episodes), each as (value, 95%
        half-width)."""
        return {"accuracy": mean_ci95(self.accuracy()), "ece_pooled": pooled_ece(self.probs, self.labels)}


@dataclass
class SupportResults:
    """The support-set attack of one method and K at one budget.

    Attributes:
        success: ``(E,)`` per episode, the fraction of its targeted (correctly classified) queries whose
            prediction flipped; NaN for an episode without one.
    """

    method: str
    k_shot: int
    epsilon: float
    steps: int
    success: np.ndarray = field(repr=False)

    def summary(self) -> tuple[float, float]:
        """Attack success rate over episodes, (mean, 95% half-width)."""
        return mean_ci95(self.success)


def episode_positions(pool: ClassSubset, episodes: EpisodeList) -> tuple[np.ndarray, np.ndarray]:
    """Pool positions of every episode's support ``(E, n_support)`` and query ``(E, n_query)`` images."""
    episodes.check_drawn_from(pool)
    arrays = episodes.arrays
    largest = max(int(pool.indices.max()), int(arrays.support_rows.max()), int(arrays.query_rows.max()))
    lookup = np.full(largest + 1, -1, dtype=np.int64)
    lookup[pool.indices] = np.arange(len(pool))
    support, query = lookup[arrays.support_rows], lookup[arrays.query_rows]
    if (support < 0).any() or (query < 0).any():
        raise DataError(f"the episodes name images outside the {pool.split} pool; redraw them")
    return support, query


def first_per_class(labels: np.ndarray, per_class: int) -> np.ndarray:
    """``(E, n)`` class-major labels -> ``(E, m)`` column indices of the first ``per_class`` of each class.

    Raises:
        DataError: an episode holds fewer than ``per_class`` queries of some class (imbalanced queries).
    """
    rank = np.zeros_like(labels)
    for c in np.unique(labels):
        rank += np.where(labels == c, np.cumsum(labels == c, axis=1) - 1, 0)
    chosen = rank < per_class
    counts = chosen.sum(axis=1)
    if (counts != counts[0]).any() or counts[0] != per_class * len(np.unique(labels)):
        raise DataError(
            f"attacks take {per_class} queries of each class per episode, but some episode has fewer; "
            "lower queries_per_class or draw balanced queries"
        )
    return np.stack([np.flatnonzero(row) for row in chosen])


def worst_case(clean: np.ndarray, attacked: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``(n, n_way)`` probabilities the attacker achieves: the attacked ones, except where the clean
    image is misclassified and the attacked one is not (the attacker leaves that image unchanged), so
    a query is robust only when it is classified correctly everywhere in the ball, clean point
    included, and robust accuracy never exceeds clean accuracy."""
    keep_clean = (clean.argmax(axis=-1) != labels) & (attacked.argmax(axis=-1) == labels)
    return np.where(keep_clean[:, None], clean, attacked)


def attack_queries(
    factory: MethodFactory,
    method: str,
    features: FeatureModel,
    images: Tensor,
    pool_features: Tensor,
    pool: ClassSubset,
    episodes: EpisodeList,
    settings: RobustnessSettings,
    progress: Callable[[int], None] | None = None,
) -> list[AttackResults]:
    """Clean and attacked results of one method on the first ``settings.episodes`` episodes.

    Args:
        factory: builds the unfitted method (one of ``ATTACKABLE``).
        method: its label.
        features: the normalising backbone (``FeatureModel``).
        images: ``(len(pool), C, H, W)`` pool images in ``[0, 1]`` (``unit_images``).
        pool_features: ``(len(pool), D)`` their clean features (the pipeline's embeddings).
        pool, episodes: the pool the episodes were drawn from, and the episodes.
        settings: the budgets, steps and sizes.
        progress: called with the number of episodes done.

    Returns:
        The ``CLEAN`` row, then one per ``settings.attacks()``.
    """
    support_pos, query_pos = episode_positions(pool, episodes)
    arrays = episodes.arrays
    n = min(settings.episodes, len(episodes))
    columns = first_per_class(arrays.query_labels[:n], settings.queries_per_class)
    attacks: list[Attack | None] = [None, *settings.attacks()]
    probs: dict[int, list[np.ndarray]] = {i: [] for i in range(len(attacks))}
    labels = np.take_along_axis(arrays.query_labels[:n], columns, axis=1)  # (n, m)
    per_call = max(1, ATTACK_BATCH_IMAGES // columns.shape[1])
    for start in range(0, n, per_call):
        chunk = slice(start, min(start + per_call, n))
        support = pool_features[torch.as_tensor(support_pos[chunk])]  # (c, n_support, D)
        model = adapt(factory, features, support, torch.as_tensor(arrays.support_labels[chunk]))
        rows = np.take_along_axis(query_pos[chunk], columns[chunk], axis=1)
        queries = images[torch.as_tensor(rows.reshape(-1))]  # (c·m, C, H, W), episode-major
        flat = labels[chunk].reshape(-1)
        targets = torch.as_tensor(flat)
        with torch.no_grad():
            clean = softmax(model(queries))
        probs[0].append(clean)
        for i, attack in enumerate(attacks[1:], start=1):
            adversarial = attack.run(model, queries, targets, settings.seed + start)
            with torch.no_grad():
                probs[i].append(worst_case(clean, softmax(model(adversarial)), flat))
        if progress is not None:
            progress(chunk.stop)
    k = episodes.k_shot
    return [
        AttackResults(method, k, attack, np.concatenate(probs[i]).reshape(*labels.shape, -1), labels)
        for i, attack in enumerate(attacks)
    ]


def attack_support(
    factory: MethodFactory,
    method: str,
    features: FeatureModel,
    images: Tensor,
    pool_features: Tensor,
    pool: ClassSubset,
    episodes: EpisodeList,
    settings: RobustnessSettings,
) -> list[SupportResults]:
    """The support-set attack: per episode, ``settings.support_targets`` correctly classified queries
    (chosen at random, seeded); for each, PGD (fewest steps of ``settings.steps``) on the first support
    image of the query's class, maximising the query's cross-entropy through the re-fitted head. The
    attacks of all episodes and targets run in batches of up to ``ATTACK_BATCH_IMAGES``
    (``SupportAttackModel``).

    Returns:
        One ``SupportResults`` per budget of ``settings.epsilons``.
    """
    support_pos, query_pos = episode_positions(pool, episodes)
    arrays = episodes.arrays
    n = min(settings.episodes, len(episodes))
    steps = min(settings.steps)
    rng = np.random.default_rng(settings.seed)
    rows = []  # (episode, query column, support index): one attack each
    for e in range(n):
        with torch.no_grad():
            fitted = factory().fit(
                pool_features[torch.as_tensor(support_pos[e])], torch.as_tensor(arrays.support_labels[e])
            )
            predicted = fitted.predict_logits(pool_features[torch.as_tensor(query_pos[e])]).argmax(dim=-1)
        correct = np.flatnonzero(predicted.numpy() == arrays.query_labels[e])
        for column in rng.permutation(correct)[: settings.support_targets]:
            index = int(np.flatnonzero(arrays.support_labels[e] == arrays.query_labels[e, column])[0])
            rows.append((e, int(column), index))
    attacks = np.array(rows, dtype=np.int64).reshape(-1, 3)
    flipped = np.zeros((len(settings.epsilons), len(attacks)))
    for start in range(0, len(attacks), ATTACK_BATCH_IMAGES):
        chunk = attacks[start : start + ATTACK_BATCH_IMAGES]
        episode, column, index = chunk.T
        labels = torch.as_tensor(arrays.query_labels[episode, column])
        model = SupportAttackModel(
            factory,
            features,
            pool_features[torch.as_tensor(support_pos[episode])],
            torch.as_tensor(arrays.support_labels[episode]),
            torch.as_tensor(index),
            pool_features[torch.as_tensor(query_pos[episode, column])],
        )
        clean_images = images[torch.as_tensor(support_pos[episode, index])]
        for i, eps in enumerate(settings.epsilons):
            adversarial = pgd(model, clean_images, labels, eps, steps, seed=settings.seed + start)
            with torch.no_grad():
                flipped[i, start : start + len(chunk)] = (model(adversarial).argmax(dim=-1) != labels).numpy()
    success = np.full((len(settings.epsilons), n), np.nan)
    for e in np.unique(attacks[:, 0]):
        success[:, e] = flipped[:, attacks[:, 0] == e].mean(axis=1)
    k = episodes.k_shot
    return [SupportResults(method, k, eps, steps, success[i]) for i, eps in enumerate(settings.epsilons)]


@dataclass(frozen=True)
class MaskingCheck:
    """The gradient-masking sanity check of one method and K (Carlini et al., "On Evaluating
    Adversarial Robustness", arXiv:1902.06705, 2019): robust accuracy should fall to about 0 at a large
    budget, and more PGD steps should never leave more accuracy than fewer (beyond the paired 95% CI).

    Attributes:
        collapse: robust accuracy at the check budget, (mean, 95% half-width).
        steps_gap: per budget, (budget, mean and half-width of accuracy(most steps) - accuracy(fewest)).
        passed: collapse below ``COLLAPSE_LIMIT`` and no gap significantly above 0.
    """

    method: str
    k_shot: int
    collapse: tuple[float, float]
    steps_gap: tuple[tuple[float, float, float], ...]
    passed: bool


#: The check's robust accuracy at the large budget must be below this (chance is 1 / n_way).
COLLAPSE_LIMIT = 0.05


def masking_check(results: Sequence[AttackResults], settings: RobustnessSettings) -> MaskingCheck:
    """The check on one method's and K's ``attack_queries`` results."""
    by_attack = {r.attack: r for r in results if r.attack is not None}
    check = by_attack[Attack("pgd", settings.check_epsilon, min(settings.steps))]
    collapse = mean_ci95(check.accuracy())
    gaps = []
    if len(settings.steps) > 1:
        fewest, most = min(settings.steps), max(settings.steps)
        for eps in settings.epsilons:
            strong, weak = by_attack[Attack("pgd", eps, most)], by_attack[Attack("pgd", eps, fewest)]
            gaps.append((eps, *paired_difference_ci95(strong.accuracy(), weak.accuracy())))
    passed = collapse[0] < COLLAPSE_LIMIT and all(mean - half <= 0 for _, mean, half in gaps)
    return MaskingCheck(check.method, check.k_shot, collapse, tuple(gaps), passed)
