"""Run few-shot methods over a fixed episode list and collect per-episode metrics.

Frozen-feature methods get features the caller computed once per pool image (row ``i`` of
``features`` is ``pool.images[i]``), so the cost grows with the number of images, not episodes:
per episode only index lookups and the method itself run. Episodes hold split rows; they are mapped
to pool positions once, and checked against the pool (same data and split, rows and classes present)
before any method runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from tqdm.auto import tqdm

from fewshot_med.data.episodes import EpisodeList
from fewshot_med.data.roles import ClassSubset
from fewshot_med.errors import DataError
from fewshot_med.evaluation.intervals import summarize
from fewshot_med.evaluation.metrics import metrics_from_probs, softmax

if TYPE_CHECKING:
    from fewshot_med.methods import FewShotMethod

MethodFactory = Callable[[], "FewShotMethod"]
GENERALISED_METRICS = ("base_accuracy", "novel_recall", "harmonic_mean")


@dataclass
class EpisodeResults:
    """Per-episode outcomes of one method at one shot count, in episode order.

    Attributes:
        method: the name results are reported under.
        k_shot: support images per class.
        metrics: one ``{metric: value}`` dict per episode.
        probs: per episode, ``(n_query, n_classes)`` float64 predicted probabilities (for
            calibration and plots; ``log(probs)`` recovers the logits up to a per-row constant).
        labels: per episode, ``(n_query,)`` int64 true labels.
    """

    method: str
    k_shot: int
    metrics: list[dict[str, float]] = field(default_factory=list)
    probs: list[np.ndarray] = field(default_factory=list)
    labels: list[np.ndarray] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.metrics)

    def add(self, probs: np.ndarray, labels: np.ndarray, metrics: dict[str, float]) -> None:
        """Append one episode's ``(n_query, n_classes)`` probabilities, ``(n_query,)`` labels, metrics."""
        self.probs.append(probs)
        self.labels.append(labels)
        self.metrics.append(metrics)

    def summary(self) -> dict[str, tuple[float, float]]:
        """``{metric: (mean, ci95_half_width)}`` over episodes."""
        return summarize(self.metrics)

    def values(self, metric: str) -> np.ndarray:
        """``(n_episodes,)`` values of one metric, e.g. for ``paired_difference_ci95``."""
        return np.asarray([values[metric] for values in self.metrics], dtype=np.float64)


class _Task(NamedTuple):
    """One episode in pool coordinates: positions into the pool and episode labels."""

    support: np.ndarray  # (n_support,) pool positions
    support_labels: np.ndarray  # (n_support,) in 0 … n_way-1
    query: np.ndarray  # (n_query,) pool positions
    query_labels: np.ndarray  # (n_query,)
    class_ids: np.ndarray  # (n_way,) pool label of each episode class


def _tasks(pool: ClassSubset, episodes: EpisodeList) -> list[_Task]:
    """Map every episode's split rows to pool positions, refusing episodes that do not fit the pool."""
    episodes.check_drawn_from(pool)
    if len(episodes) == 0 or len(pool) == 0:
        raise DataError(f"{len(episodes)} episodes on a pool of {len(pool)} images: nothing to evaluate")
    lookup = np.full(int(pool.indices.max()) + 1, -1, dtype=np.int64)
    lookup[pool.indices] = np.arange(len(pool))

    def positions(rows: np.ndarray, labels: np.ndarray, class_ids: np.ndarray, index: int) -> np.ndarray:
        found = np.full(len(rows), -1, dtype=np.int64)
        inside = rows < len(lookup)
        found[inside] = lookup[rows[inside]]
        if (found < 0).any() or (pool.labels[found] != class_ids[labels]).any():
            raise DataError(
                f"episode {index}: its rows are not images of its classes in the {pool.split} pool "
                f"{list(pool.class_names)}; the episodes were drawn from other classes, redraw them"
            )
        return found

    tasks = []
    for index, episode in enumerate(episodes.episodes):
        unknown = [name for name in episode.classes if name not in pool.class_names]
        if unknown:
            raise DataError(
                f"episode {index}: classes {unknown} are not among the pool classes {list(pool.class_names)}"
            )
        class_ids = np.asarray([pool.class_names.index(name) for name in episode.classes])
        support_labels, query_labels = episode.support_labels(), episode.query_labels()
        support = positions(episode.support_rows(), support_labels, class_ids, index)
        query = positions(episode.query_rows(), query_labels, class_ids, index)
        tasks.append(_Task(support, support_labels, query, query_labels, class_ids))
    return tasks


def _new_method(method_factory: MethodFactory, inputs: str) -> FewShotMethod:
    method = method_factory()
    if method.inputs != inputs:
        runner = "evaluate_frozen" if method.inputs == "features" else "evaluate_images"
        raise ValueError(f"{type(method).__name__} takes {method.inputs}, not {inputs}: run it with {runner}")
    return method


def _run(
    method_factory: MethodFactory,
    gather: Callable[[np.ndarray], torch.Tensor],
    pool: ClassSubset,
    episodes: EpisodeList,
    inputs: str,
    label: str | None,
) -> EpisodeResults:
    """Fit a fresh method per episode on ``gather(support positions)``; score its query logits."""
    results = EpisodeResults(label or "", episodes.k_shot)
    for task in tqdm(_tasks(pool, episodes), desc=label, disable=None, leave=False):
        method = _new_method(method_factory, inputs)
        results.method = results.method or type(method).__name__
        support = gather(task.support)
        method.fit(support, torch.as_tensor(task.support_labels, device=support.device))
        probs = softmax(method.predict_logits(gather(task.query)))
        results.add(probs, task.query_labels, metrics_from_probs(probs, task.query_labels))
    return results


def _label_array(labels: np.ndarray | torch.Tensor) -> np.ndarray:
    """``(n,)`` int64 labels on the CPU."""
    return np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels, dtype=np.int64)


def _check_rows(name: str, array: torch.Tensor | np.ndarray, pool: ClassSubset) -> None:
    if len(array) != len(pool):
        raise DataError(
            f"{name} has {len(array)} rows but the {pool.split} pool holds {len(pool)} images; "
            "row i must be pool image i"
        )


def evaluate_frozen(
    method_factory: MethodFactory,
    features: torch.Tensor,
    pool: ClassSubset,
    episodes: EpisodeList,
    *,
    label: str | None = None,
) -> EpisodeResults:
    """Evaluate a frozen-feature method on every episode.

    Args:
        method_factory: returns a fresh, unfitted method with ``inputs == "features"``.
        features: ``(len(pool), D)`` embeddings, row ``i`` of ``pool.images[i]``, on the method's device.
        pool: the images the episodes were drawn from.
        episodes: the episode list (identical for every method compared).
        label: name of the results; defaults to the method's class name.

    Returns:
        Per-episode metrics, probabilities and labels.
    """
    _check_rows("features", features, pool)

    def gather(positions: np.ndarray) -> torch.Tensor:
        return features[torch.as_tensor(positions, device=features.device)]

    return _run(method_factory, gather, pool, episodes, "features", label)


def evaluate_images(
    method_factory: MethodFactory,
    images: torch.Tensor | np.ndarray,
    pool: ClassSubset,
    episodes: EpisodeList,
    to_input: Callable[[np.ndarray | torch.Tensor], torch.Tensor],
    *,
    label: str | None = None,
) -> EpisodeResults:
    """Evaluate an image-based (fine-tuning) method on every episode.

    Args:
        method_factory: returns a fresh, unfitted method with ``inputs == "images"``.
        images: ``(len(pool), H, W, C)`` uint8 pool images (``pool.images``, or a tensor of them).
        pool: the images the episodes were drawn from.
        episodes: the episode list.
        to_input: turns ``(n, H, W, C)`` uint8 into normalised ``(n, C, H, W)`` model input on the
            method's device (e.g. ``to_model_input`` with the backbone's statistics).
        label: name of the results; defaults to the method's class name.

    Returns:
        Per-episode metrics, probabilities and labels.
    """
    _check_rows("images", images, pool)

    def gather(positions: np.ndarray) -> torch.Tensor:
        if isinstance(images, torch.Tensor):
            return to_input(images[torch.as_tensor(positions, device=images.device)])
        return to_input(images[positions])

    return _run(method_factory, gather, pool, episodes, "images", label)


def evaluate_generalised(
    method_factory: MethodFactory,
    base_train_features: torch.Tensor,
    base_train_labels: np.ndarray | torch.Tensor,
    base_test_features: torch.Tensor,
    base_test_labels: np.ndarray | torch.Tensor,
    novel_features: torch.Tensor,
    pool: ClassSubset,
    episodes: EpisodeList,
    *,
    base_shots: int = 50,
    base_queries: int = 15,
    n_episodes: int | None = None,
    seed: int = 0,
    label: str | None = None,
) -> EpisodeResults:
    """Generalised few-shot evaluation: classify over base and novel classes together.

    Per episode the same frozen-feature method is fitted on one ``(B + n_way)``-way support set:
    ``base_shots`` base train features per base class (a class-balanced sample, all of a class if it
    has fewer) as labels ``0 … B-1``, plus the episode's K novel shots as labels ``B …``. It then
    classifies the episode's novel queries and ``base_queries`` base test images per base class (a
    class-balanced sample, so ``base_accuracy`` is close to the mean base-class recall). The base
    samples come from ``numpy.random.default_rng([seed, episode index])``, so the first episodes of a
    longer run are identical to a shorter one. Labels in ``probs``/``labels`` are base first, then novel.

    Metrics per episode: ``base_accuracy`` (base test images predicted as their class),
    ``novel_recall`` (novel queries predicted as their class), and their ``harmonic_mean``
    (0 when both are 0). Predicting any wrong class, base or novel, counts as an error.

    Args:
        method_factory: returns a fresh, unfitted method with ``inputs == "features"``.
        base_train_features: ``(N_train, D)`` features of the base classes' train images.
        base_train_labels: ``(N_train,)`` base labels ``0 … B-1``.
        base_test_features: ``(N_test, D)`` features of the base classes' test images.
        base_test_labels: ``(N_test,)`` base labels ``0 … B-1``.
        novel_features: ``(len(pool), D)`` features of the novel pool the episodes come from.
        pool: the novel-class images the episodes were drawn from.
        episodes: the episode list.
        base_shots: cap on base train features per base class in the support set.
        base_queries: cap on base test images per base class per episode.
        n_episodes: use only the first ``n_episodes`` episodes (all if unset).
        seed: seed of the base samples.
        label: name of the results; defaults to the method's class name.

    Returns:
        Per-episode ``GENERALISED_METRICS``, ``(n_base_query + n_query, B + n_way)`` probabilities, labels.
    """
    _check_rows("novel_features", novel_features, pool)
    train_labels, test_labels = _label_array(base_train_labels), _label_array(base_test_labels)
    n_base = int(max(train_labels.max(), test_labels.max())) + 1
    train_rows = [np.flatnonzero(train_labels == c) for c in range(n_base)]
    test_rows = [np.flatnonzero(test_labels == c) for c in range(n_base)]
    empty = [c for c in range(n_base) if len(train_rows[c]) == 0 or len(test_rows[c]) == 0]
    if empty or train_labels.min() < 0 or test_labels.min() < 0:
        raise DataError(
            f"base labels must be 0 … {n_base - 1} with train and test images of each; "
            f"classes {empty} lack some"
        )
    if n_episodes is not None:
        episodes = dataclasses.replace(episodes, episodes=episodes.episodes[:n_episodes])
    device = novel_features.device
    base_train, base_test = base_train_features.to(device), base_test_features.to(device)

    def rows(source: torch.Tensor, positions: np.ndarray) -> torch.Tensor:
        return source[torch.as_tensor(positions, device=device)]

    results = EpisodeResults(label or "", episodes.k_shot)
    for index, task in enumerate(tqdm(_tasks(pool, episodes), desc=label, disable=None, leave=False)):
        rng = np.random.default_rng([seed, index])
        shots = np.concatenate([rng.choice(r, min(base_shots, len(r)), replace=False) for r in train_rows])
        queries = np.concatenate([rng.choice(r, min(base_queries, len(r)), replace=False) for r in test_rows])
        support = torch.cat([rows(base_train, shots), rows(novel_features, task.support)])
        support_labels = np.concatenate([train_labels[shots], n_base + task.support_labels])
        query = torch.cat([rows(base_test, queries), rows(novel_features, task.query)])
        query_labels = np.concatenate([test_labels[queries], n_base + task.query_labels])
        method = _new_method(method_factory, "features")
        results.method = results.method or type(method).__name__
        method.fit(support, torch.as_tensor(support_labels, device=device))
        probs = softmax(method.predict_logits(query))
        correct = probs.argmax(axis=1) == query_labels
        base_accuracy = float(correct[: len(queries)].mean())
        novel_recall = float(correct[len(queries) :].mean())
        total = base_accuracy + novel_recall
        harmonic_mean = 2 * base_accuracy * novel_recall / total if total > 0 else 0.0
        metrics = dict(zip(GENERALISED_METRICS, (base_accuracy, novel_recall, harmonic_mean), strict=True))
        results.add(probs, query_labels, metrics)
    return results


def evaluate_oracle(
    features_train_novel: torch.Tensor,
    labels_train_novel: np.ndarray | torch.Tensor,
    pool_features: torch.Tensor,
    pool: ClassSubset,
    episodes: EpisodeList,
    *,
    C: float = 1.0,
    label: str = "oracle",
) -> EpisodeResults:
    """The upper bound: a linear probe trained on all novel-class train images, scored per episode.

    Multinomial logistic regression (scikit-learn, L2 penalty, ``class_weight="balanced"`` because
    episode queries are class-balanced while the train split is not) on L2-normalised features is
    fitted once. Each episode's queries are then scored with the probe's logits for that episode's
    classes only (softmax over those columns), so its metrics pair with the few-shot methods' on the
    same episodes (``paired_difference_ci95``).

    Args:
        features_train_novel: ``(N, D)`` features of the novel classes' train images.
        labels_train_novel: ``(N,)`` labels in ``pool.class_names`` order; every class must occur.
        pool_features: ``(len(pool), D)`` features, row ``i`` of ``pool.images[i]``.
        pool: the images the episodes were drawn from.
        episodes: the episode list.
        C: inverse L2 regularisation strength.
        label: name of the results.

    Returns:
        Per-episode metrics, probabilities and labels (support sets are not used).
    """
    _check_rows("pool_features", pool_features, pool)
    labels = _label_array(labels_train_novel)
    if set(labels.tolist()) != set(range(len(pool.class_names))):
        raise DataError(
            f"oracle train labels {sorted(set(labels.tolist()))} must cover exactly the pool's classes "
            f"0 … {len(pool.class_names) - 1} ({list(pool.class_names)}), with train images of each"
        )
    train = F.normalize(features_train_novel.detach().float().cpu(), dim=1).numpy()
    probe = LogisticRegression(C=C, class_weight="balanced", max_iter=1000).fit(train, labels)
    scores = probe.decision_function(F.normalize(pool_features.detach().float().cpu(), dim=1).numpy())
    if scores.ndim == 1:  # two classes: scikit-learn gives the logit of class 1 against class 0
        scores = np.stack([np.zeros_like(scores), scores], axis=1)
    results = EpisodeResults(label, episodes.k_shot)
    for task in _tasks(pool, episodes):
        probs = softmax(scores[np.ix_(task.query, task.class_ids)])
        results.add(probs, task.query_labels, metrics_from_probs(probs, task.query_labels))
    return results
