"""Seeded N-way K-shot Q-query episodes, savable to JSON so every method sees identical tasks.

Episode ``i`` of a list drawn with seed ``s`` depends only on ``(s, i)``: a list of 600 episodes
starts with the same 100 episodes as a list of 100. Indices are rows of the split the episodes were
drawn from, so any library can rebuild the tasks from the original arrays.

Query cap: every balanced episode holds the same number of queries per class,
``min(n_query, fewest images of any candidate class - k_shot)``; the list records both the
requested and the used number. A class with fewer than ``k_shot + 1`` images is an error.

Imbalanced queries (``query_dirichlet_alpha``; Veilleux, Boudiaf, Piantanida & Ben Ayed, "Realistic
evaluation of transductive few-shot learning", NeurIPS 2021): each episode still holds
``n_way * n_query`` queries, but splits them across its classes by proportions
``p ~ Dirichlet(alpha * 1_{n_way})`` (``split_queries``), so a class may get none. The support keeps
``k_shot`` images per class, queries stay grouped by class, and every episode keeps the balanced
list's array shapes, so every consumer of ``EpisodeList.arrays`` works unchanged.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from fewshot_med._io import write_text_atomic
from fewshot_med.data.roles import ClassSubset
from fewshot_med.errors import DataError

FORMAT_VERSION = 1


@dataclass(frozen=True)
class Episode:
    """One few-shot task.

    Attributes:
        classes: the ``n_way`` class names; episode label ``i`` means ``classes[i]``.
        support: per class, the ``k_shot`` split rows of its support images.
        query: per class, the split rows of its query images (``n_query`` each, or, in a list with
            ``query_dirichlet_alpha``, a Dirichlet share of ``n_way * n_query``, possibly none).
    """

    classes: tuple[str, ...]
    support: tuple[tuple[int, ...], ...]
    query: tuple[tuple[int, ...], ...]

    def support_rows(self) -> np.ndarray:
        """``(n_way * k_shot,)`` split rows, class-major."""
        return np.concatenate([np.asarray(rows, dtype=np.int64) for rows in self.support])

    def support_labels(self) -> np.ndarray:
        """``(n_way * k_shot,)`` episode labels matching ``support_rows``."""
        return np.repeat(np.arange(len(self.classes)), [len(rows) for rows in self.support])

    def query_rows(self) -> np.ndarray:
        """``(n_way * n_query,)`` split rows, class-major (grouped by class; groups may differ in size)."""
        return np.concatenate([np.asarray(rows, dtype=np.int64) for rows in self.query])

    def query_labels(self) -> np.ndarray:
        """``(n_way * n_query,)`` episode labels matching ``query_rows``."""
        return np.repeat(np.arange(len(self.classes)), [len(rows) for rows in self.query])


class EpisodeArrays(NamedTuple):
    """An episode list as arrays: ``E`` episodes of ``n_way`` classes, rows of the split."""

    classes: np.ndarray  # (E, n_way) class names, object dtype
    support_rows: np.ndarray  # (E, n_way * k_shot) split rows, class-major
    support_labels: np.ndarray  # (E, n_way * k_shot) episode labels 0 … n_way-1
    query_rows: np.ndarray  # (E, n_way * n_query)
    query_labels: np.ndarray  # (E, n_way * n_query)


@dataclass(frozen=True)
class EpisodeList:
    """Episodes drawn from one split of one dataset, with everything needed to redraw them.

    ``n_query`` is the used number of queries per class, so every episode holds ``n_way * n_query``
    queries; ``query_dirichlet_alpha`` is ``None`` for balanced queries, else the Dirichlet
    concentration that split them across classes (see the module docstring).
    """

    dataset_digest: str
    split: str
    n_way: int
    k_shot: int
    n_query: int
    n_query_requested: int
    seed: int
    episodes: tuple[Episode, ...]
    query_dirichlet_alpha: float | None = None

    def __len__(self) -> int:
        return len(self.episodes)

    @cached_property
    def arrays(self) -> EpisodeArrays:
        """Every episode stacked into arrays (computed once per list; runners of every method reuse it).

        Raises:
            DataError: the episodes differ in shape (``sample_episodes`` never draws such lists).
        """
        shapes = {(len(e.classes), len(e.support_rows()), len(e.query_rows())) for e in self.episodes}
        if len(shapes) > 1:
            raise DataError(
                f"the episodes differ in size (classes, support, query): {sorted(shapes)}; every episode "
                "of a list must have the same shape, as sample_episodes draws them"
            )
        return EpisodeArrays(
            classes=np.array([e.classes for e in self.episodes], dtype=object),
            support_rows=np.stack([e.support_rows() for e in self.episodes]),
            support_labels=np.stack([e.support_labels() for e in self.episodes]),
            query_rows=np.stack([e.query_rows() for e in self.episodes]),
            query_labels=np.stack([e.query_labels() for e in self.episodes]),
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready form ``save`` writes (and pipelines log as artifacts), with its format version.

        A balanced list leaves out ``query_dirichlet_alpha``, so it serialises exactly as before the
        field existed (same bytes, same ``digest``)."""
        fields = asdict(self)
        if self.query_dirichlet_alpha is None:
            del fields["query_dirichlet_alpha"]
        return {"format_version": FORMAT_VERSION, **fields}

    def digest(self) -> str:
        """SHA-256 of the list's canonical JSON (``to_dict`` without the format version, sorted keys):
        the same list gives the same digest anywhere."""
        fields = {k: v for k, v in self.to_dict().items() if k != "format_version"}
        return hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    def save(self, path: str | Path) -> None:
        """Write the list as JSON (atomically: a crash leaves no partial file)."""
        write_text_atomic(Path(path), json.dumps(self.to_dict(), separators=(",", ":")))

    @classmethod
    def load(cls, path: str | Path) -> EpisodeList:
        """Read a list written by ``save`` (files without ``query_dirichlet_alpha`` are balanced)."""
        path = Path(path)
        try:
            payload = json.loads(path.read_text(encoding="utf-8"))
            if payload.pop("format_version") != FORMAT_VERSION:
                raise ValueError(f"format_version is not {FORMAT_VERSION}")
            episodes = tuple(
                Episode(
                    classes=tuple(e["classes"]),
                    support=tuple(tuple(rows) for rows in e["support"]),
                    query=tuple(tuple(rows) for rows in e["query"]),
                )
                for e in payload.pop("episodes")
            )
            return cls(**payload, episodes=episodes)
        except FileNotFoundError:
            raise DataError(f"{path}: no such episode file; check the path") from None
        except (ValueError, KeyError, TypeError) as error:
            raise DataError(f"{path}: not an episode list written by fewshot-med ({error})") from None

    def check_drawn_from(self, pool: ClassSubset) -> None:
        """Refuse to run these episodes on data other than the data they were drawn from."""
        if (pool.dataset_digest, pool.split) != (self.dataset_digest, self.split):
            raise DataError(
                f"episodes were drawn from the {self.split} split of dataset {self.dataset_digest[:12]}, "
                f"not from the {pool.split} split of {pool.dataset_digest[:12]}; redraw them for this data"
            )


def split_queries(proportions: np.ndarray, total: int, room: np.ndarray) -> np.ndarray:
    """Split ``total`` queries across classes by ``proportions``, no class above its ``room``.

    Largest-remainder (Hamilton) rounding: each class gets ``floor(p * total)`` and the queries left
    go one each to the largest fractional parts (ties to the lower class index), so the counts sum to
    ``total`` exactly. This is what Veilleux et al. (NeurIPS 2021, ``convert_prob_to_samples``)
    compute by rounding and then moving the fractions closest to 1/2. A class whose share exceeds its
    room gets its room, and the excess is split the same way across the classes that still have room,
    by their proportions (evenly when those are all zero), until every class fits.

    Args:
        proportions: ``(n_way,)`` non-negative class proportions summing to 1 (a Dirichlet draw).
        total: queries to split.
        room: ``(n_way,)`` images each class has left for queries (after its support).

    Returns:
        ``(n_way,)`` int64 query counts, summing to ``total``, each at most its ``room``.

    Raises:
        DataError: the classes have fewer than ``total`` images left between them.
    """
    proportions, room = np.asarray(proportions, dtype=np.float64), np.asarray(room, dtype=np.int64)
    if room.sum() < total:
        raise DataError(
            f"{total} queries cannot be split across classes with {room.tolist()} images left after "
            "their support: lower n_query or k_shot"
        )
    counts = np.zeros(len(room), dtype=np.int64)
    full = np.zeros(len(room), dtype=bool)
    while True:
        free = np.flatnonzero(~full)
        left = total - int(counts[full].sum())
        weights = proportions[free] if proportions[free].sum() > 0 else np.ones(len(free))
        shares = weights / weights.sum() * left
        share = np.floor(shares).astype(np.int64)
        share[np.argsort(-(shares - share), kind="stable")[: left - int(share.sum())]] += 1
        over = share > room[free]
        if not over.any():
            counts[free] = share
            return counts
        counts[free[over]] = room[free[over]]
        full[free[over]] = True


def sample_episodes(
    pool: ClassSubset,
    n_way: int,
    k_shot: int,
    n_query: int,
    n_episodes: int,
    seed: int,
    query_dirichlet_alpha: float | None = None,
) -> EpisodeList:
    """Draw episodes from a pool of classes (e.g. the novel classes of the test split).

    Args:
        pool: candidate images, labelled ``0 … len(pool.class_names) - 1``.
        n_way: classes per episode (at most the pool's class count).
        k_shot: support images per class.
        n_query: requested query images per class (capped, see the module docstring).
        n_episodes: how many episodes.
        seed: a non-negative integer; the list is a pure function of ``(pool, n_way, k_shot, n_query, seed,
            query_dirichlet_alpha)``.
        query_dirichlet_alpha: ``None`` for ``n_query`` queries per class; else each episode splits
            its ``n_way * n_query`` queries by ``p ~ Dirichlet(alpha * 1_{n_way})`` (Veilleux et al.,
            NeurIPS 2021, use alpha = 2; smaller is more imbalanced). The cap on ``n_query`` keeps
            every class with at least ``n_query`` images left after its support, so the split always
            fits.

    Returns:
        The episodes, rows given in ``pool.split`` coordinates, queries grouped by class.
    """
    n_classes = len(pool.class_names)
    if not 2 <= n_way <= n_classes:
        raise DataError(f"n_way={n_way}: must be between 2 and the pool's {n_classes} classes")
    if k_shot < 1 or n_query < 1 or n_episodes < 1:
        raise DataError(f"k_shot={k_shot}, n_query={n_query}, n_episodes={n_episodes}: each must be ≥ 1")
    if seed < 0:  # numpy seed sequences take non-negative integers only
        raise DataError(f"seed={seed}: must be ≥ 0")
    if query_dirichlet_alpha is not None:
        if not 0 < query_dirichlet_alpha < math.inf:
            raise DataError(
                f"query_dirichlet_alpha={query_dirichlet_alpha}: must be finite and > 0 (or None: balanced)"
            )
        query_dirichlet_alpha = float(query_dirichlet_alpha)  # 2 and 2.0 give the same list and digest
    counts = np.bincount(pool.labels, minlength=n_classes)
    smallest = int(np.argmin(counts))
    if counts[smallest] < k_shot + 1:
        raise DataError(
            f"class '{pool.class_names[smallest]}' has {counts[smallest]} images in the {pool.split} split; "
            f"{k_shot}-shot episodes need at least {k_shot + 1} (K support + 1 query): lower k_shot"
        )
    n_query_used = min(n_query, int(counts.min()) - k_shot)
    rows_of_class = [pool.indices[pool.labels == c] for c in range(n_classes)]
    episodes = []
    for index in range(n_episodes):
        rng = np.random.default_rng([seed, index])  # episode i depends on (seed, i) only: prefix-stable
        classes = np.sort(rng.choice(n_classes, size=n_way, replace=False))
        if query_dirichlet_alpha is None:
            n_queries = [n_query_used] * n_way
        else:
            proportions = rng.dirichlet(np.full(n_way, query_dirichlet_alpha))
            n_queries = split_queries(proportions, n_way * n_query_used, counts[classes] - k_shot).tolist()
        support, query = [], []
        for c, n_class_queries in zip(classes, n_queries, strict=True):
            drawn = rng.choice(rows_of_class[c], size=k_shot + n_class_queries, replace=False)
            support.append(tuple(int(r) for r in drawn[:k_shot]))
            query.append(tuple(int(r) for r in drawn[k_shot:]))
        episodes.append(Episode(tuple(pool.class_names[c] for c in classes), tuple(support), tuple(query)))
    return EpisodeList(
        dataset_digest=pool.dataset_digest,
        split=pool.split,
        n_way=n_way,
        k_shot=k_shot,
        n_query=n_query_used,
        n_query_requested=n_query,
        seed=seed,
        episodes=tuple(episodes),
        query_dirichlet_alpha=query_dirichlet_alpha,
    )
