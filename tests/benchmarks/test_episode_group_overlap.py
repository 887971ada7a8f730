"""The lesion-twin count of benchmarks.scripts.episode_group_overlap: by hand, and on HAM10000."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks.scripts.episode_group_overlap import overlap
from fewshot_med.data import Episode, EpisodeList

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
