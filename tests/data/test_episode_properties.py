"""Property-based tests of the seeded episode sampler (``sample_episodes``): for any pool and request,
either a list that keeps the protocol (distinct classes, K support + capped Q query per class, support
and query disjoint, rows from their own class) and is a pure function of its seed, or one line of
``FewshotMedError``."""

import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fewshot_med.data import ClassSubset, EpisodeList, sample_episodes
from fewshot_med.errors import FewshotMedError


def _pool(counts: list[int]) -> ClassSubset:
    """Classes ``c0 …`` with ``counts`` images, shuffled, at split rows that are not pool positions."""
    labels = np.random.default_rng(0).permutation(np.repeat(np.arange(len(counts)), counts))
    return ClassSubset(
        images=np.zeros((len(labels), 2, 2, 3), np.uint8),
        labels=labels,
        indices=np.arange(len(labels)) * 3 + 5,
        class_names=tuple(f"c{i}" for i in range(len(counts))),
        split="test",
        dataset_digest="d" * 64,
    )


requests = st.fixed_dictionaries(
    {
        "counts": st.lists(st.integers(0, 12), min_size=1, max_size=6),
        "n_way": st.integers(0, 7),
        "k_shot": st.integers(0, 5),
        "n_query": st.integers(0, 8),
        "n_episodes": st.integers(1, 4),
        "seed": st.integers(-3, 3) | st.integers(0, 2**63),
        "alpha": st.none() | st.floats(0.05, 20),
    }
)


def _possible(r: dict) -> bool:
    return (
        2 <= r["n_way"] <= len(r["counts"])
        and r["k_shot"] >= 1
        and r["n_query"] >= 1
        and r["seed"] >= 0
        and min(r["counts"]) >= r["k_shot"] + 1
    )


def _draw(pool: ClassSubset, r: dict, n_episodes: int | None = None) -> EpisodeList:
    return sample_episodes(
        pool,
        r["n_way"],
        r["k_shot"],
        r["n_query"],
        n_episodes or r["n_episodes"],
        r["seed"],
        query_dirichlet_alpha=r["alpha"],
    )


@settings(max_examples=150, deadline=None)
@given(requests)
def test_episodes_keep_the_protocol_or_refuse_in_one_line(r):
    pool = _pool(r["counts"])
    if not _possible(r):
        with pytest.raises(FewshotMedError) as error:
            _draw(pool, r)
        assert "\n" not in str(error.value)
        return
    episodes = _draw(pool, r)
    n_way, k_shot = r["n_way"], r["k_shot"]
    counts = np.asarray(r["counts"])
    n_query = min(r["n_query"], int(counts.min()) - k_shot)  # the documented cap
    assert (episodes.n_way, episodes.k_shot, episodes.n_query) == (n_way, k_shot, n_query)
    assert episodes.n_query_requested == r["n_query"] and len(episodes) == r["n_episodes"]
    rows_of = {name: set(pool.indices[pool.labels == c].tolist()) for c, name in enumerate(pool.class_names)}
    for episode in episodes.episodes:
        assert len(set(episode.classes)) == n_way and set(episode.classes) <= set(pool.class_names)
        assert [len(rows) for rows in episode.support] == [k_shot] * n_way
        query_counts = [len(rows) for rows in episode.query]
        if r["alpha"] is None:
            assert query_counts == [n_query] * n_way
        else:  # the Dirichlet split: n_way * n_query in all, none above what the class has left
            assert sum(query_counts) == n_way * n_query
            room = [counts[pool.class_names.index(name)] - k_shot for name in episode.classes]
            assert all(0 <= q <= left for q, left in zip(query_counts, room, strict=True))
        for name, support, query in zip(episode.classes, episode.support, episode.query, strict=True):
            drawn = list(support) + list(query)
            assert len(set(drawn)) == len(drawn)  # support and query disjoint, no image twice
            assert set(drawn) <= rows_of[name]  # rows of the split, inside the class's own pool
        labels = episode.query_labels()
        assert labels.tolist() == sorted(labels.tolist())  # queries grouped by class
    again = _draw(pool, r)
    assert again == episodes and again.digest() == episodes.digest()
    assert _draw(pool, r, n_episodes=1).episodes == episodes.episodes[:1]  # prefix-stable
    with tempfile.TemporaryDirectory() as folder:
        episodes.save(Path(folder) / "e.json")
        loaded = EpisodeList.load(Path(folder) / "e.json")
    assert loaded == episodes and loaded.digest() == episodes.digest()


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32), st.integers(0, 2**32))
def test_another_seed_draws_other_episodes(seed, other):
    pool = _pool([10, 10, 10, 10])
    first, second = (sample_episodes(pool, 2, 1, 3, 5, s) for s in (seed, other))
    assert (first.episodes == second.episodes) == (seed == other)
