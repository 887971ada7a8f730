"""The lesion-twin count of benchmarks.scripts.episode_group_overlap: by hand, and on HAM10000."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.scripts.episode_group_overlap import TEMPERATURE_FITS, overlap, temperature_by_twin
from fewshot_med.config import Config
from fewshot_med.data import ClassSubset, Episode, EpisodeList
from fewshot_med.data.episodes import sample_episodes
from fewshot_med.evaluation import evaluate_frozen
from fewshot_med.evaluation.calibration import TemperatureScaling
from fewshot_med.methods import MethodContext, create_method
from fewshot_med.pipelines.episodes import Episodes

REPO = Path(__file__).resolve().parents[2]


def test_a_query_counts_only_when_its_own_class_support_holds_its_group():
    groups = np.asarray(["a", "a", "b", "c", "c", "d"], dtype=object)
    episodes = EpisodeList(
        dataset_digest="x",
        split="test",
        n_way=2,
        k_shot=1,
        n_query=2,
        n_query_requested=2,
        seed=0,
        episodes=(
            # class 0: support a, queries a (twin) and b; class 1: support c, queries c (twin) and d
            Episode(("p", "q"), ((0,), (3,)), ((1, 2), (4, 5))),
            # the twin of class 0's support sits in class 1's queries: not a twin of its own class
            Episode(("p", "q"), ((0,), (3,)), ((2, 5), (1, 5))),
        ),
    )
    queries, touched = overlap(episodes, groups)
    assert queries == pytest.approx(2 / 8) and touched == pytest.approx(1 / 2)


def synthetic_pool(split: str, per_class: int, seed: int) -> tuple[ClassSubset, torch.Tensor]:
    """Three overlapping Gaussian classes of 8-d features (images are placeholders)."""
    generator = torch.Generator().manual_seed(seed)
    labels = np.repeat(np.arange(3), per_class)
    features = torch.randn(len(labels), 8, generator=generator) + 1.5 * torch.eye(8)[labels]
    pool = ClassSubset(
        images=np.zeros((len(labels), 1, 1, 1), dtype=np.uint8),
        labels=labels,
        indices=np.arange(len(labels)),
        class_names=("a", "b", "c"),
        split=split,
        dataset_digest="synthetic",
    )
    return pool, features


@pytest.mark.parametrize("twins", ["none", "all"])
def test_the_twin_free_temperature_is_fitted_on_exactly_the_queries_without_a_twin(twins, tiny_pipeline):
    config = Config.model_validate({**tiny_pipeline, "methods": [{"name": "simpleshot"}, {"name": "pt_map"}]})
    pools, features = {}, {}
    for split, seed in (("val", 0), ("test", 1)):
        pools[split], features[split] = synthetic_pool(split, 12, seed)
    lists = Episodes(
        test={1: sample_episodes(pools["test"], 3, 1, 5, 20, 0)},
        val={1: sample_episodes(pools["val"], 3, 1, 5, 20, 1)},
    )
    n = len(pools["val"])
    # every image its own group (no twin), or every class one group (every query a twin)
    groups = {
        "val": np.arange(n).astype(str) if twins == "none" else pools["val"].labels.astype(str),
        "test": np.arange(len(pools["test"])).astype(str),
    }
    context = MethodContext(base_feature_mean=torch.zeros(8))
    (entry,) = temperature_by_twin(config, features, context, pools, lists, groups)  # pt_map only
    assert (entry.method, entry.k_shot) == ("pt_map", 1) and list(entry.fits) == list(TEMPERATURE_FITS)
    val = evaluate_frozen(
        lambda: create_method("pt_map", context), features["val"], pools["val"], lists.val[1]
    )
    expected = TemperatureScaling(t_max=100.0).fit(val.logits, val.labels).temperature_
    assert entry.fits["all val queries"][0] == pytest.approx(expected)
    if twins == "none":
        assert entry.val_twin_accuracy is None and entry.fits["val queries without a twin"][
            0
        ] == pytest.approx(expected)
        assert entry.row().split("|")[3].strip().startswith("— / ")
    else:
        assert entry.val_other_accuracy is None and entry.fits["val queries without a twin"] is None
        assert entry.row().split("|")[5].strip() == "—"


@pytest.mark.real_data
def test_on_ham10000_more_shots_put_more_lesion_twins_among_the_test_queries(shared_data, tmp_path):
    command = [sys.executable, "-m", "benchmarks.scripts.episode_group_overlap", "configs/ham10000.yaml"]
    run = {
        "capture_output": True,
        "text": True,
        "cwd": REPO,
        "env": {**os.environ, "FEWSHOT_MED_DATA": str(shared_data)},
    }
    done = subprocess.run(
        [*command, "--groups", str(shared_data / "ham10000_derma/split_index.csv")], check=True, **run
    )
    rows = [line.split("|")[1:-1] for line in done.stdout.splitlines() if line.startswith("| test |")]
    shares = {int(k): float(share.strip(" %")) for _, k, _, share, _ in rows}
    assert sorted(shares) == [1, 5, 10] and 0 < shares[1] < shares[5] < shares[10] < 100
    bad = tmp_path / "groups.csv"
    bad.write_text("split,index_in_split,dx\nval,0,akiec\n")
    refused = subprocess.run([*command, "--groups", str(bad)], **run)
    assert refused.returncode != 0 and "no column 'lesion_id'" in refused.stderr
