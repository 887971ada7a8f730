"""Run few-shot methods over a fixed episode list and collect per-episode metrics.

Frozen-feature methods get features the caller computed once per pool image (row ``i`` of
``features`` is ``pool.images[i]``), so the cost grows with the number of images, not episodes. They
are fitted on all episodes at once: the episodes' support and query features are gathered into
``(E, n, D)`` tensors and one batched ``fit``/``predict_logits`` call scores them, and the metrics
are computed for all episodes in one vectorised pass. Episodes hold split rows; they are mapped to pool
positions once, and checked against the pool (same data and split, rows and classes present) before
any method runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from fewshot_med.data.episodes import EpisodeList
from fewshot_med.data.roles import ClassSubset
from fewshot_med.errors import DataError
from fewshot_med.evaluation.intervals import summarize
from fewshot_med.evaluation.metrics import METRICS, metrics_from_probs, pooled_ece, softmax
from fewshot_med.evaluation.selective import accuracy_at_coverage
from fewshot_med.progress import Progress

if TYPE_CHECKING:
    from fewshot_med.methods import FewShotMethod

MethodFactory = Callable[[], "FewShotMethod"]
GENERALISED_METRICS = ("base_accuracy", "novel_recall", "harmonic_mean")
#: fraction of most confident queries kept by the ``accuracy_at_coverage`` metric unless set
DEFAULT_COVERAGE = 0.8
#: gathered feature entries per leave-one-out batch (bounds its memory to about 200 MB of float32)
LEAVE_ONE_OUT_ENTRIES = 50_000_000
#: frozen-feature episodes fitted per batched call (bounds the memory of the gathered features)
EPISODES_PER_BATCH = 1000


@dataclass
class EpisodeResults:
    """Per-episode outcomes of one method at one shot count, in episode order.

    Attributes:
        method: the name results are reported under.
        k_shot: support images per class.
        logits: ``(E, n_query, n_classes)`` float64 logits of every episode's queries (what
            calibrators fit on; a softmax gives the probabilities).
        labels: ``(E, n_query)`` int64 true labels.
        metrics: ``{metric: (E,) values}``, one value per episode.
        calibration: how the logits were calibrated: ``"none"`` or a ``CALIBRATION_SETTINGS`` name.
        calibrator: the calibrator's fitted parameters, for logging.
        class_ids: ``(E, n_classes)`` index into ``class_names`` of each episode column.
        class_names: names of the pool's classes (for confusion matrices across episodes).
        support_logits: ``(E, n_support, n_classes)`` leave-one-out logits of each support sample
            (from a method fitted on the rest of its support set), when computed.
        support_labels: ``(E, n_support)`` labels of the support samples, with ``support_logits``.
        params: the hyperparameters the val episodes chose for these results (a method's ``search``;
            empty when nothing was searched).
        search_scores: every combination the search tried, with its mean val-episode accuracy.
        coverage: the fraction of most confident queries ``accuracy_at_coverage`` keeps.
        n_bins: confidence bins of the binned calibration metrics.
    """

    method: str
    k_shot: int
    logits: np.ndarray
    labels: np.ndarray
    metrics: dict[str, np.ndarray]
    calibration: str = "none"
    calibrator: dict[str, float] = field(default_factory=dict)
    class_ids: np.ndarray | None = None
    class_names: tuple[str, ...] = ()
    support_logits: np.ndarray | None = None
    support_labels: np.ndarray | None = None
    params: dict[str, Any] = field(default_factory=dict)
    search_scores: tuple[tuple[dict[str, Any], float], ...] = ()
    coverage: float = DEFAULT_COVERAGE
    n_bins: int = 15
    _summary: dict[str, tuple[float, float]] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def probs(self) -> np.ndarray:
        """``(E, n_query, n_classes)`` predicted probabilities."""
        return softmax(self.logits)

    def summary(self) -> dict[str, tuple[float, float]]:
        """``{metric: (mean, ci95_half_width)}`` over episodes, plus ``ece_pooled``: the ECE of all
        queries pooled, with a bootstrap interval over episodes (``pooled_ece``), when the results
        hold class probabilities of several classes. Computed once (the bootstrap is the costly part);
        each call returns a copy."""
        if self._summary is None:
            self._summary = summarize(self.metrics)
            finite = ~np.isnan(self.metrics["accuracy"]) if "accuracy" in self.metrics else None
            if "ece" in self.metrics and finite is not None and finite.any():
                probs, labels = self.probs[finite], self.labels[finite]
                self._summary["ece_pooled"] = pooled_ece(probs, labels, self.n_bins)
        return dict(self._summary)

    @property
    def n_failed(self) -> int:
        """Episodes whose logits were not finite (every metric NaN there; summaries skip them)."""
        return int(np.isnan(self.metrics["accuracy"]).sum()) if "accuracy" in self.metrics else 0

    def values(self, metric: str) -> np.ndarray:
        """``(E,)`` values of one metric, e.g. for ``paired_difference_ci95``."""
        return self.metrics[metric]

    def pooled_class_labels(self) -> tuple[np.ndarray, np.ndarray]:
        """``(true, predicted)`` pool class indices of every query of every episode, ``(E · n_query,)``
        each, for a confusion matrix over ``class_names`` (episodes may order their classes differently)."""
        if self.class_ids is None:
            raise ValueError(f"{self.method}: these results carry no class ids")
        predicted = self.logits.argmax(axis=-1)
        return (
            np.take_along_axis(self.class_ids, self.labels, axis=1).ravel(),
            np.take_along_axis(self.class_ids, predicted, axis=1).ravel(),
        )

    def with_logits(
        self, logits: np.ndarray, calibration: str, calibrator: dict[str, float]
    ) -> EpisodeResults:
        """The same episodes re-scored with calibrated ``(E, n_query, n_classes)`` logits."""
        scored = score_episodes(self.method, self.k_shot, logits, self.labels, self.coverage, self.n_bins)
        return dataclasses.replace(
            self, logits=scored.logits, metrics=scored.metrics, calibration=calibration, calibrator=calibrator
        )


def score_episodes(
    method: str,
    k_shot: int,
    logits: np.ndarray | torch.Tensor,
    labels: np.ndarray,
    coverage: float = DEFAULT_COVERAGE,
    n_bins: int = 15,
) -> EpisodeResults:
    """Results with every ``METRICS`` value of ``(E, n_query, C)`` logits against ``(E, n_query)``
    labels (binned ones over ``n_bins`` bins), plus ``accuracy_at_coverage``: accuracy on the
    ``coverage`` fraction of most confident queries of each episode (selective prediction).

    An episode whose logits are not all finite (a method that broke down on it) gets NaN for every
    metric, so it shows as failed (``EpisodeResults.n_failed``) instead of breaking the others."""
    if isinstance(logits, torch.Tensor):
        logits = logits.detach().cpu().double().numpy()
    logits, labels = np.asarray(logits, dtype=np.float64), np.asarray(labels, dtype=np.int64)
    probs = softmax(logits)
    finite = np.isfinite(probs).all(axis=(-2, -1)).reshape(-1) if probs.ndim == 3 else np.array([True])
    scored = probs[finite] if probs.ndim == 3 else probs
    scored_labels = labels[finite] if probs.ndim == 3 else labels
    values = metrics_from_probs(scored, scored_labels, n_bins) if finite.any() else dict.fromkeys(METRICS)
    values["accuracy_at_coverage"] = (
        accuracy_at_coverage(scored, scored_labels, coverage) if finite.any() else None
    )
    metrics = {}
    for name, value in values.items():
        metrics[name] = np.full(len(finite), np.nan)
        if value is not None:
            metrics[name][finite] = np.atleast_1d(value)
    return EpisodeResults(method, k_shot, logits, labels, metrics, coverage=coverage, n_bins=n_bins)


class _Tasks(NamedTuple):
    """Every episode in pool coordinates, stacked (all episodes of a list have the same sizes)."""

    support: np.ndarray  # (E, n_support) pool positions
    support_labels: np.ndarray  # (E, n_support) in 0 … n_way-1
    query: np.ndarray  # (E, n_query) pool positions
    query_labels: np.ndarray  # (E, n_query)
    class_ids: np.ndarray  # (E, n_way) pool label of each episode class


def _tasks(pool: ClassSubset, episodes: EpisodeList) -> _Tasks:
    """Map every episode's split rows to pool positions, refusing episodes that do not fit the pool."""
    episodes.check_drawn_from(pool)
    if len(episodes) == 0 or len(pool) == 0:
        raise DataError(f"{len(episodes)} episodes on a pool of {len(pool)} images: nothing to evaluate")
    arrays = episodes.arrays
    class_index = {name: index for index, name in enumerate(pool.class_names)}
    unknown = sorted(set(arrays.classes.ravel()) - set(class_index))
    if unknown:
        raise DataError(
            f"episodes name classes {unknown} that are not among the pool classes {list(class_index)}"
        )
    class_ids = np.vectorize(class_index.__getitem__, otypes=[np.int64])(arrays.classes)
    largest = max(int(pool.indices.max()), int(arrays.support_rows.max()), int(arrays.query_rows.max()))
    lookup = np.full(largest + 1, -1, dtype=np.int64)
    lookup[pool.indices] = np.arange(len(pool))
    support, query = lookup[arrays.support_rows], lookup[arrays.query_rows]
    for positions, labels in ((support, arrays.support_labels), (query, arrays.query_labels)):
        wrong = (positions < 0) | (pool.labels[positions] != np.take_along_axis(class_ids, labels, axis=1))
        if wrong.any():
            first = int(np.flatnonzero(wrong.any(axis=1))[0])
            raise DataError(
                f"episode {first}: its rows are not images of its classes in the {pool.split} pool "
                f"{list(pool.class_names)}; the episodes were drawn from other classes, redraw them"
            )
    return _Tasks(support, arrays.support_labels, query, arrays.query_labels, class_ids)


def support_sets(
    features: torch.Tensor, pool: ClassSubset, episodes: EpisodeList
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every episode's support set: features ``(E, n_support, D)`` and labels ``(E, n_support)``, from
    the ``(len(pool), D)`` embeddings of the pool the episodes were drawn from."""
    _check_rows("features", features, pool)
    tasks = _tasks(pool, episodes)
    positions = torch.as_tensor(tasks.support, device=features.device)
    return features[positions], torch.as_tensor(tasks.support_labels, device=features.device)


def _one_by_one(tasks: _Tasks, label: str | None) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Each episode's support positions, support labels and query positions, with its progress shown
    (a bar on a terminal, a line a minute in a log file)."""
    episodes = zip(tasks.support, tasks.support_labels, tasks.query, strict=True)
    with Progress(label or "episodes", total=len(tasks.support), unit="episode") as progress:
        for done, episode in enumerate(episodes):
            yield episode
            progress.update(done + 1)


def _new_method(method_factory: MethodFactory, inputs: str) -> FewShotMethod:
    method = method_factory()
    if method.inputs != inputs:
        runner = "evaluate_frozen" if method.inputs == "features" else "evaluate_images"
        raise ValueError(f"{type(method).__name__} takes {method.inputs}, not {inputs}: run it with {runner}")
    return method


def _batched_logits(
    method_factory: MethodFactory,
    support: torch.Tensor,
    support_labels: np.ndarray,
    queries: torch.Tensor,
    positions: np.ndarray | None = None,
) -> tuple[np.ndarray, type[FewShotMethod]]:
    """Fit fresh frozen-feature methods on ``(E, n_support, D)`` supports, ``EPISODES_PER_BATCH`` at a
    time, and score the queries.

    ``queries`` are either ``(E, n_query, D)`` per-episode features, or ``(N, D)`` pool features shared
    by every episode with ``positions`` ``(E, n_query)`` picking each episode's queries: then an
    inductive method scores the whole pool once (``(E, N, n_way)``, no per-episode copy of the
    features) and the queries' rows are taken from it, while a transductive one gets each episode's
    own queries gathered (it infers over the batch it is given).

    Returns:
        ``(E, n_query, n_way)`` float64 logits and the method's class.
    """
    chunks, kind = [], type(None)
    labels = torch.as_tensor(support_labels, device=support.device)
    for start in range(0, len(support), EPISODES_PER_BATCH):
        stop = start + EPISODES_PER_BATCH
        method = _new_method(method_factory, "features")
        kind = type(method)
        method.fit(support[start:stop], labels[start:stop])
        if positions is None:
            chunks.append(method.predict_logits(queries[start:stop]).double().numpy())
        elif method.transductive:
            rows = torch.as_tensor(positions[start:stop], device=queries.device)
            chunks.append(method.predict_logits(queries[rows]).double().numpy())
        else:
            pool_logits = method.predict_logits(queries).double().numpy()  # (chunk, N, n_way)
            chunks.append(np.take_along_axis(pool_logits, positions[start:stop, :, None], axis=1))
    return np.concatenate(chunks), kind


def _label_array(labels: np.ndarray | torch.Tensor) -> np.ndarray:
    """``(n,)`` int64 labels on the CPU."""
    return np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels, dtype=np.int64)


def _check_rows(name: str, array: torch.Tensor | np.ndarray, pool: ClassSubset) -> None:
    if len(array) != len(pool):
        raise DataError(
            f"{name} has {len(array)} rows but the {pool.split} pool holds {len(pool)} images; "
            "row i must be pool image i"
        )


def leave_one_out_logits(
    method_factory: MethodFactory, support: torch.Tensor, support_labels: np.ndarray
) -> np.ndarray:
    """Logits of every support sample from a method fitted on the rest of its episode's support set.

    For ``E`` episodes of ``n`` support samples this fits ``E · n`` frozen-feature classifiers of
    ``n - 1`` samples each, in batches (every class keeps a sample only when each has at least 2).
    The held-out predictions are what a per-episode calibrator can fit on without the queries.

    Args:
        method_factory: returns a fresh, unfitted method with ``inputs == "features"``.
        support: ``(E, n, D)`` support features.
        support_labels: ``(E, n)`` labels in ``0 … n_way-1``, every class at least twice per episode.

    Returns:
        ``(E, n, n_way)`` float64 held-out logits.
    """
    n_episodes, n, dim = support.shape
    counts = np.apply_along_axis(np.bincount, 1, support_labels)
    if counts.min() < 2:
        raise ValueError("leave-one-out needs at least 2 support samples of every class in every episode")
    rest = np.stack([np.delete(np.arange(n), i) for i in range(n)])  # (n, n - 1): all but sample i
    rest_t = torch.as_tensor(rest, device=support.device)
    per_chunk = max(1, LEAVE_ONE_OUT_ENTRIES // (n * (n - 1) * dim))
    chunks = []
    for start in range(0, n_episodes, per_chunk):
        part, labels = support[start : start + per_chunk], support_labels[start : start + per_chunk]
        fits = part[:, rest_t].reshape(-1, n - 1, dim)  # (chunk · n, n - 1, D)
        held_out = part.reshape(-1, 1, dim)  # (chunk · n, 1, D)
        logits, _ = _batched_logits(method_factory, fits, labels[:, rest].reshape(-1, n - 1), held_out)
        chunks.append(logits.reshape(len(part), n, -1))
    return np.concatenate(chunks)


def evaluate_frozen(
    method_factory: MethodFactory,
    features: torch.Tensor,
    pool: ClassSubset,
    episodes: EpisodeList,
    *,
    label: str | None = None,
    coverage: float = DEFAULT_COVERAGE,
    n_bins: int = 15,
    leave_one_out: bool = False,
) -> EpisodeResults:
    """Evaluate a frozen-feature method on every episode, all episodes in one batched fit.

    Args:
        method_factory: returns a fresh, unfitted method with ``inputs == "features"``.
        features: ``(len(pool), D)`` embeddings, row ``i`` of ``pool.images[i]``, on the method's device.
        pool: the images the episodes were drawn from.
        episodes: the episode list (identical for every method compared).
        label: name of the results; defaults to the method's class name.
        coverage: kept fraction of the ``accuracy_at_coverage`` metric.
        n_bins: bins of the binned calibration metrics.
        leave_one_out: also compute the support samples' held-out logits (``leave_one_out_logits``;
            needs ``k_shot ≥ 2`` and an inductive method), for per-episode calibration.

    Returns:
        Per-episode metrics, logits and labels.
    """
    _check_rows("features", features, pool)
    tasks = _tasks(pool, episodes)

    def gather(positions: np.ndarray) -> torch.Tensor:
        return features[torch.as_tensor(positions, device=features.device)]

    support = gather(tasks.support)
    n_query, n_way = tasks.query.shape[1], tasks.class_ids.shape[1]
    if len(pool) * n_way <= n_query * features.shape[1]:  # scoring the pool is cheaper than copying queries
        logits, kind = _batched_logits(method_factory, support, tasks.support_labels, features, tasks.query)
    else:
        logits, kind = _batched_logits(method_factory, support, tasks.support_labels, gather(tasks.query))
    if leave_one_out and kind.transductive:
        raise ValueError("leave-one-out logits need an inductive method (transductive ones read the queries)")
    results = score_episodes(
        label or kind.__name__, episodes.k_shot, logits, tasks.query_labels, coverage, n_bins
    )
    results.class_ids, results.class_names = tasks.class_ids, tuple(pool.class_names)
    if leave_one_out:
        results.support_logits = leave_one_out_logits(method_factory, support, tasks.support_labels)
        results.support_labels = tasks.support_labels
    return results


def evaluate_images(
    method_factory: MethodFactory,
    images: torch.Tensor | np.ndarray,
    pool: ClassSubset,
    episodes: EpisodeList,
    to_input: Callable[[np.ndarray | torch.Tensor], torch.Tensor],
    *,
    label: str | None = None,
    coverage: float = DEFAULT_COVERAGE,
    n_bins: int = 15,
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
        coverage: kept fraction of the ``accuracy_at_coverage`` metric.
        n_bins: bins of the binned calibration metrics.

    Returns:
        Per-episode metrics, logits and labels.
    """
    _check_rows("images", images, pool)

    def gather(positions: np.ndarray) -> torch.Tensor:
        if isinstance(images, torch.Tensor):
            return to_input(images[torch.as_tensor(positions, device=images.device)])
        return to_input(images[positions])

    tasks, logits, name = _tasks(pool, episodes), [], ""
    for support, support_labels, query in _one_by_one(tasks, label):
        method = _new_method(method_factory, "images")
        name = type(method).__name__
        batch = gather(support)
        method.fit(batch, torch.as_tensor(support_labels, device=batch.device))
        logits.append(method.predict_logits(gather(query)).double().numpy())
    results = score_episodes(
        label or name, episodes.k_shot, np.stack(logits), tasks.query_labels, coverage, n_bins
    )
    results.class_ids, results.class_names = tasks.class_ids, tuple(pool.class_names)
    return results


EpisodeClassifier = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def evaluate_episodewise(
    classify: EpisodeClassifier,
    features: torch.Tensor,
    pool: ClassSubset,
    episodes: EpisodeList,
    *,
    label: str,
    coverage: float = DEFAULT_COVERAGE,
    n_bins: int = 15,
) -> EpisodeResults:
    """Evaluate a classifier that handles one episode at a time (another library's method, a
    transductive one that needs the episode's queries) on the same episodes as every other method.

    Args:
        classify: ``(support (n_support, D), labels (n_support,), queries (n_query, D))`` -> ``(n_query,
            n_way)`` logits (log-probabilities do). It sees one episode at a time and may use its queries.
        features: ``(len(pool), D)`` embeddings, row ``i`` of ``pool.images[i]``.
        pool: the images the episodes were drawn from.
        episodes: the episode list (identical for every method compared).
        label: name of the results.
        coverage: kept fraction of the ``accuracy_at_coverage`` metric.
        n_bins: bins of the binned calibration metrics.

    Returns:
        Per-episode metrics, logits and labels. Non-finite logits stay as they are, so a classifier
        that fails on some episodes shows NaN metrics there instead of a silently repaired score.
    """
    _check_rows("features", features, pool)
    tasks, logits = _tasks(pool, episodes), []
    for support, support_labels, query in _one_by_one(tasks, label):
        rows = lambda positions: features[torch.as_tensor(positions, device=features.device)]  # noqa: E731
        labels = torch.as_tensor(support_labels, device=features.device)
        logits.append(classify(rows(support), labels, rows(query)).detach().double().cpu().numpy())
    results = score_episodes(label, episodes.k_shot, np.stack(logits), tasks.query_labels, coverage, n_bins)
    results.class_ids, results.class_names = tasks.class_ids, tuple(pool.class_names)
    return results


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
    base_class_names: Sequence[str] = (),
) -> EpisodeResults:
    """Generalised few-shot evaluation: classify over base and novel classes together.

    Per episode the same frozen-feature method is fitted on one ``(B + n_way)``-way support set:
    ``base_shots`` base train features per base class (a class-balanced sample, all of a class if it
    has fewer) as labels ``0 … B-1``, plus the episode's K novel shots as labels ``B …``. It then
    classifies the episode's novel queries and ``base_queries`` base test images per base class (a
    class-balanced sample, so ``base_accuracy`` is close to the mean base-class recall). The base
    samples come from ``numpy.random.default_rng([seed, episode index])``, so the first episodes of a
    longer run are identical to a shorter one. Labels in ``logits``/``labels`` are base first, then novel.
    All episodes are fitted in one batched call, like ``evaluate_frozen``.

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
        base_class_names: names of base labels ``0 … B-1``, for confusion matrices over all classes.

    Returns:
        Per-episode ``GENERALISED_METRICS``, ``(E, n_base_query + n_query, B + n_way)`` logits, labels.
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

    tasks = _tasks(pool, episodes)
    shots, queries = [], []
    for index in range(len(tasks.support)):
        rng = np.random.default_rng([seed, index])
        shots.append(
            np.concatenate([rng.choice(r, min(base_shots, len(r)), replace=False) for r in train_rows])
        )
        queries.append(
            np.concatenate([rng.choice(r, min(base_queries, len(r)), replace=False) for r in test_rows])
        )
    shots, queries = np.stack(shots), np.stack(queries)  # (E, base support), (E, base queries)
    support = torch.cat([rows(base_train, shots), rows(novel_features, tasks.support)], dim=1)
    support_labels = np.concatenate([train_labels[shots], n_base + tasks.support_labels], axis=1)
    query = torch.cat([rows(base_test, queries), rows(novel_features, tasks.query)], dim=1)
    query_labels = np.concatenate([test_labels[queries], n_base + tasks.query_labels], axis=1)
    logits, kind = _batched_logits(method_factory, support, support_labels, query)
    correct = logits.argmax(axis=-1) == query_labels
    base_accuracy = correct[:, : queries.shape[1]].mean(axis=1)
    novel_recall = correct[:, queries.shape[1] :].mean(axis=1)
    total = base_accuracy + novel_recall
    harmonic_mean = np.divide(
        2 * base_accuracy * novel_recall, total, out=np.zeros_like(total), where=total > 0
    )
    metrics = dict(zip(GENERALISED_METRICS, (base_accuracy, novel_recall, harmonic_mean), strict=True))
    class_ids = np.concatenate(
        [np.broadcast_to(np.arange(n_base), (len(logits), n_base)), n_base + tasks.class_ids], axis=1
    )
    return EpisodeResults(
        label or kind.__name__,
        episodes.k_shot,
        logits,
        query_labels,
        metrics,
        class_ids=class_ids,
        class_names=(*base_class_names, *pool.class_names) if base_class_names else (),
    )


def evaluate_oracle(
    features_train_novel: torch.Tensor,
    labels_train_novel: np.ndarray | torch.Tensor,
    pool_features: torch.Tensor,
    pool: ClassSubset,
    episodes: EpisodeList,
    *,
    C: float = 1.0,
    label: str = "oracle",
    coverage: float = DEFAULT_COVERAGE,
    n_bins: int = 15,
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
        coverage: kept fraction of the ``accuracy_at_coverage`` metric.
        n_bins: bins of the binned calibration metrics.

    Returns:
        Per-episode metrics, logits and labels (support sets are not used).
    """
    from sklearn.linear_model import LogisticRegression  # imported here: sklearn takes seconds to import

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
    tasks = _tasks(pool, episodes)
    logits = scores[tasks.query[:, :, None], tasks.class_ids[:, None, :]]  # (E, n_query, n_way)
    results = score_episodes(label, episodes.k_shot, logits, tasks.query_labels, coverage, n_bins)
    results.class_ids, results.class_names = tasks.class_ids, tuple(pool.class_names)
    return results
