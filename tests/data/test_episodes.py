import json

import numpy as np
import pytest

from fewshot_med.data import ClassSubset, EpisodeList, load_dataset, sample_episodes, select_classes
from fewshot_med.errors import DataError


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
