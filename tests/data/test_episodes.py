import hashlib
import json
import math

import numpy as np
import pytest
import torch

from fewshot_med.data import ClassSubset, EpisodeList, load_dataset, sample_episodes, select_classes
from fewshot_med.data.episodes import split_queries
from fewshot_med.errors import DataError
from fewshot_med.evaluation import evaluate_frozen
from fewshot_med.methods import MethodContext, create_method


def _pool(counts=(30, 25, 40), split="test", digest="d" * 64) -> ClassSubset:
    labels = np.repeat(np.arange(len(counts)), counts)
    indices = np.arange(len(labels)) * 2 + 7  # split rows differ from pool positions
    return ClassSubset(
        images=np.zeros((len(labels), 4, 4, 3), np.uint8),
        labels=labels,
        indices=indices,
        class_names=tuple(f"c{i}" for i in range(len(counts))),
        split=split,
        dataset_digest=digest,
    )


def test_episode_structure():
    pool = _pool()
    row_class = dict(zip(pool.indices.tolist(), pool.labels.tolist(), strict=True))
    episodes = sample_episodes(pool, n_way=2, k_shot=5, n_query=15, n_episodes=50, seed=0)
    assert len(episodes) == 50 and episodes.n_query == 15
    for episode in episodes.episodes:
        support, query = episode.support_rows(), episode.query_rows()
        assert support.shape == (10,) and query.shape == (30,)
        assert not set(support) & set(query)
        assert len(set(support)) == 10 and len(set(query)) == 30
        for rows, labels in ((support, episode.support_labels()), (query, episode.query_labels())):
            names = [pool.class_names[row_class[r]] for r in rows]
            assert names == [episode.classes[label] for label in labels]
        assert list(episode.classes) == sorted(episode.classes)
    assert len({e.classes for e in episodes.episodes}) == 3  # all 3 pairs of classes occur


def test_reproducible_and_prefix_stable():
    pool = _pool()
    long = sample_episodes(pool, 3, 1, 15, 100, seed=4)
    assert sample_episodes(pool, 3, 1, 15, 100, seed=4) == long
    assert sample_episodes(pool, 3, 1, 15, 10, seed=4).episodes == long.episodes[:10]
    assert sample_episodes(pool, 3, 1, 15, 100, seed=5).episodes != long.episodes


def test_every_image_gets_used_over_many_episodes():
    pool = _pool()
    episodes = sample_episodes(pool, 3, 5, 10, 200, seed=0)
    used = set(np.concatenate([np.r_[e.support_rows(), e.query_rows()] for e in episodes.episodes]))
    assert used == set(pool.indices.tolist())


def test_json_round_trip(tmp_path):
    episodes = sample_episodes(_pool(), 3, 5, 15, 20, seed=1)
    path = tmp_path / "sub" / "episodes.json"
    episodes.save(path)
    assert EpisodeList.load(path) == episodes
    payload = json.loads(path.read_text())
    assert payload["format_version"] == 1 and payload["k_shot"] == 5
    assert payload["episodes"][0]["support"][0] == list(episodes.episodes[0].support[0])
    assert [p.name for p in path.parent.iterdir()] == ["episodes.json"]  # no temp files left


def test_query_cap_and_too_few_images():
    episodes = sample_episodes(_pool((30, 12, 40)), 3, 5, 15, 3, seed=0)
    assert (episodes.n_query, episodes.n_query_requested) == (7, 15)
    assert all(len(rows) == 7 for e in episodes.episodes for rows in e.query)
    with pytest.raises(
        DataError, match=r"class 'c1' has 12 images in the test split; 12-shot .* at least 13"
    ):
        sample_episodes(_pool((30, 12, 40)), 3, 12, 15, 3, seed=0)
    with pytest.raises(DataError, match="n_way=4"):
        sample_episodes(_pool(), 4, 1, 15, 3, seed=0)


def test_load_errors_and_lineage_check(tmp_path):
    with pytest.raises(DataError, match="no such episode file"):
        EpisodeList.load(tmp_path / "absent.json")
    (tmp_path / "bad.json").write_text('{"format_version": 1, "episodes": []}')
    with pytest.raises(DataError, match=r"bad\.json: not an episode list"):
        EpisodeList.load(tmp_path / "bad.json")
    episodes = sample_episodes(_pool(), 3, 1, 5, 2, seed=0)
    episodes.check_drawn_from(_pool())
    with pytest.raises(DataError, match="redraw them for this data"):
        episodes.check_drawn_from(_pool(digest="e" * 64))
    with pytest.raises(DataError, match="not from the val split"):
        episodes.check_drawn_from(_pool(split="val"))


@pytest.mark.real_data
def test_ham10000_protocol_query_counts(shared_data):
    dataset = load_dataset("ham10000-28")
    test_pool = select_classes(dataset, "test", ["akiec", "df", "vasc"])
    ten_shot = sample_episodes(test_pool, 3, 10, 15, 600, seed=0)
    assert ten_shot.n_query == 15  # df has 25 test images: K = 10 leaves exactly 15 queries
    val_pool = select_classes(dataset, "val", ["akiec", "df", "vasc"])
    assert sample_episodes(val_pool, 3, 5, 15, 10, seed=0).n_query == 5  # df has 10 val images
    labels = dataset.splits["test"].labels
    for episode in ten_shot.episodes[:50]:
        names = [dataset.class_names[c] for c in labels[episode.query_rows()]]
        assert names == [episode.classes[q] for q in episode.query_labels()]


# Class-imbalanced queries (Veilleux et al., NeurIPS 2021): ``query_dirichlet_alpha``.

# sha256 of the saved JSON of balanced lists, computed with the sampler before imbalanced queries existed.
BALANCED_DIGESTS = [
    ((30, 25, 40), (3, 5, 15, 50, 0), "9cb2284e4b17f224000406e35281737cb3765d735358fee99ea96ec15e720c8d"),
    ((30, 12, 40), (2, 1, 15, 100, 7), "581f9f9043b2963c4e861584c757f5736bb8f075de8a3e745b53160e49aef054"),
]


@pytest.mark.parametrize(("counts", "args", "saved_sha256"), BALANCED_DIGESTS)
def test_balanced_lists_are_byte_identical_to_before(tmp_path, counts, args, saved_sha256):
    episodes = sample_episodes(_pool(counts), *args)
    assert sample_episodes(_pool(counts), *args, query_dirichlet_alpha=None) == episodes
    path = tmp_path / "episodes.json"
    episodes.save(path)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == saved_sha256
    assert "query_dirichlet_alpha" not in episodes.to_dict()
    assert EpisodeList.load(path).query_dirichlet_alpha is None


def test_digest_of_balanced_lists_is_unchanged():
    # the digest benchmarks recorded before (sha256 of the sorted-key JSON of the list's fields)
    balanced = sample_episodes(_pool(), 3, 5, 15, 50, 0)
    assert balanced.digest() == "a885a4720d365b8057668287d0357424a2f36871a0c8106a26d643426fb41415"
    assert sample_episodes(_pool(), 3, 5, 15, 50, 0, query_dirichlet_alpha=2.0).digest() != balanced.digest()


def _check_imbalanced(pool: ClassSubset, episodes: EpisodeList, k_shot: int) -> None:
    """Every property an imbalanced list keeps: K support per class, a fixed query total, disjoint
    support and query, rows of the right classes, queries grouped by class."""
    row_class = dict(zip(pool.indices.tolist(), pool.labels.tolist(), strict=True))
    n_way, total = episodes.n_way, episodes.n_way * episodes.n_query
    for episode in episodes.episodes:
        support, query = episode.support_rows(), episode.query_rows()
        assert [len(rows) for rows in episode.support] == [k_shot] * n_way
        assert sum(len(rows) for rows in episode.query) == len(query) == total
        assert len(set(support) | set(query)) == len(support) + len(query)  # no row twice, none in both
        for rows, labels in ((support, episode.support_labels()), (query, episode.query_labels())):
            assert [pool.class_names[row_class[r]] for r in rows] == [episode.classes[i] for i in labels]
        assert np.all(np.diff(episode.query_labels()) >= 0)  # class-major
    arrays = episodes.arrays
    assert arrays.query_rows.shape == arrays.query_labels.shape == (len(episodes), total)
    assert arrays.support_rows.shape == (len(episodes), n_way * k_shot)


@pytest.mark.parametrize("case", range(40))
def test_imbalanced_episodes_keep_the_protocol(case):
    rng = np.random.default_rng(case)  # a random pool and protocol per case (property test)
    n_classes = int(rng.integers(2, 6))
    k_shot = int(rng.integers(1, 6))
    counts = tuple(int(c) for c in rng.integers(k_shot + 1, k_shot + 25, size=n_classes))
    n_way = int(rng.integers(2, n_classes + 1))
    alpha = float(rng.choice([0.05, 0.5, 2.0, 20.0]))
    pool = _pool(counts)
    episodes = sample_episodes(pool, n_way, k_shot, int(rng.integers(1, 20)), 15, case, alpha)
    assert episodes.query_dirichlet_alpha == alpha
    assert episodes.n_query == min(episodes.n_query_requested, min(counts) - k_shot)
    _check_imbalanced(pool, episodes, k_shot)


def test_imbalanced_lists_are_reproducible_and_prefix_stable():
    pool = _pool()
    long = sample_episodes(pool, 3, 1, 15, 60, seed=4, query_dirichlet_alpha=2.0)
    assert sample_episodes(pool, 3, 1, 15, 60, seed=4, query_dirichlet_alpha=2) == long
    short = sample_episodes(pool, 3, 1, 15, 10, seed=4, query_dirichlet_alpha=2.0)
    assert short.episodes == long.episodes[:10]
    assert sample_episodes(pool, 3, 1, 15, 60, seed=5, query_dirichlet_alpha=2.0).episodes != long.episodes
    assert sample_episodes(pool, 3, 1, 15, 60, seed=4, query_dirichlet_alpha=1.0).episodes != long.episodes
    assert sample_episodes(pool, 3, 1, 15, 60, seed=4).episodes != long.episodes


def _mean_largest_share(episodes: EpisodeList) -> float:
    total = episodes.n_way * episodes.n_query
    return float(np.mean([max(len(rows) for rows in e.query) / total for e in episodes.episodes]))


def test_smaller_alpha_gives_more_imbalance():
    pool = _pool((60, 60, 60))
    shares = [
        _mean_largest_share(sample_episodes(pool, 3, 1, 15, 300, seed=0, query_dirichlet_alpha=alpha))
        for alpha in (0.3, 2.0, 50.0)
    ]
    assert shares[0] > shares[1] > shares[2] > 1 / 3
    assert _mean_largest_share(sample_episodes(pool, 3, 1, 15, 300, seed=0)) == pytest.approx(1 / 3)
    skewed = sample_episodes(pool, 3, 1, 15, 300, seed=0, query_dirichlet_alpha=0.3)
    assert any(len(rows) == 0 for e in skewed.episodes for rows in e.query)  # a class may get no query


def test_imbalanced_counts_are_capped_by_the_images_a_class_has_left():
    pool = _pool((8, 60, 60))  # class c0 keeps 6 images after 2 support: at most 6 queries
    episodes = sample_episodes(pool, 3, 2, 15, 200, seed=0, query_dirichlet_alpha=0.3)
    assert episodes.n_query == 6
    assert max(len(e.query[0]) for e in episodes.episodes) == 6
    _check_imbalanced(pool, episodes, 2)


def test_split_queries_apportions_by_largest_remainder():
    assert split_queries(np.array([0.5, 0.3, 0.2]), 10, np.array([10, 10, 10])).tolist() == [5, 3, 2]
    # 7 * (0.45, 0.35, 0.2) = (3.15, 2.45, 1.4): floors (3, 2, 1), the one left goes to the largest .45
    assert split_queries(np.array([0.45, 0.35, 0.2]), 7, np.array([9, 9, 9])).tolist() == [3, 3, 1]
    # ties go to the lower class index
    assert split_queries(np.array([0.5, 0.5]), 3, np.array([9, 9])).tolist() == [2, 1]
    # class 0 is capped at 2; its excess goes to the others by their proportions (0.3 : 0.1)
    assert split_queries(np.array([0.6, 0.3, 0.1]), 10, np.array([2, 20, 20])).tolist() == [2, 6, 2]
    # the classes with room have proportion 0: the excess is split evenly
    assert split_queries(np.array([1.0, 0.0, 0.0]), 9, np.array([3, 9, 9])).tolist() == [3, 3, 3]


@pytest.mark.parametrize("case", range(60))
def test_split_queries_sums_to_the_total_within_the_room(case):
    rng = np.random.default_rng(case)
    n_way = int(rng.integers(2, 7))
    proportions = rng.dirichlet(np.full(n_way, rng.choice([0.01, 0.5, 2.0])))
    room = rng.integers(0, 12, size=n_way)
    total = int(rng.integers(0, room.sum() + 1))
    counts = split_queries(proportions, total, room)
    assert counts.sum() == total and np.all((counts >= 0) & (counts <= room))
    if np.all(proportions * total <= room):  # no cap binds: every count is its share rounded
        assert np.all(np.abs(counts - proportions * total) < 1)


def test_split_queries_and_sampler_refuse_what_the_pool_cannot_supply():
    with pytest.raises(DataError, match=r"10 queries cannot be split across classes with \[3, 4\] images"):
        split_queries(np.array([0.5, 0.5]), 10, np.array([3, 4]))
    for alpha in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(DataError, match=r"query_dirichlet_alpha=.*must be finite and > 0"):
            sample_episodes(_pool(), 3, 1, 5, 3, seed=0, query_dirichlet_alpha=alpha)
    with pytest.raises(DataError, match=r"class 'c1' has 12 images in the test split"):
        sample_episodes(_pool((30, 12, 40)), 3, 12, 15, 3, seed=0, query_dirichlet_alpha=2.0)


def test_imbalanced_json_round_trip_and_old_files_load_balanced(tmp_path):
    episodes = sample_episodes(_pool(), 3, 5, 15, 20, seed=1, query_dirichlet_alpha=2)
    path = tmp_path / "episodes.json"
    episodes.save(path)
    payload = json.loads(path.read_text())
    assert payload["query_dirichlet_alpha"] == 2.0
    loaded = EpisodeList.load(path)
    assert loaded == episodes and loaded.digest() == episodes.digest()
    del payload["query_dirichlet_alpha"]  # a file written before the field existed
    path.write_text(json.dumps(payload))
    assert EpisodeList.load(path).query_dirichlet_alpha is None


@pytest.mark.parametrize("method", ["protonet", "simpleshot"])
def test_frozen_evaluation_runs_on_imbalanced_episodes(method):
    rng = np.random.default_rng(0)
    pool = _pool((20, 25, 30))
    features = torch.tensor(10.0 * np.eye(8)[pool.labels] + rng.normal(size=(len(pool.labels), 8))).float()
    episodes = sample_episodes(pool, 3, 2, 10, 12, seed=0, query_dirichlet_alpha=2.0)
    context = MethodContext(base_feature_mean=torch.zeros(8))
    results = evaluate_frozen(lambda: create_method(method, context), features, pool, episodes)
    assert results.logits.shape == (12, 30, 3)
    np.testing.assert_array_equal(results.labels, episodes.arrays.query_labels)
    assert results.summary()["accuracy"][0] > 0.9
    assert np.all(np.isfinite(results.values("balanced_accuracy")))
