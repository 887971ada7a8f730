"""How often a query shares its lesion (or patient) with a support image of its own class.

HAM10000 holds several images of one lesion (``split_index.csv``: ``lesion_id``). Its splits are
grouped by lesion, so no lesion crosses splits, but inside one split an episode may draw a support
image and a query of the same lesion: a near-duplicate that makes the query easy. For a config, this
draws the pipeline's val and test episode lists (``draw_episodes``, the config's seed) and reports per
list and K the share of queries whose group is among the support groups of their class, and the share
of episodes with at least one such query. The groups come from a CSV with columns ``split``,
``index_in_split`` (the row in the split's arrays), ``dx`` (the class name, checked against the data)
and the group column. Nothing is trained; it takes seconds.

Run: ``python -m benchmarks.scripts.episode_group_overlap configs/ham10000.yaml``
``--groups ${FEWSHOT_MED_DATA:-../shared/data}/ham10000_derma/split_index.csv [--column lesion_id]``
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

from fewshot_med.config import load_config
from fewshot_med.data import ClassSubset, EpisodeList
from fewshot_med.errors import FewshotMedError
from fewshot_med.pipelines.episodes import draw_episodes
from fewshot_med.pipelines.stages import load_data


def read_groups(path: Path, column: str, pools: dict[str, ClassSubset]) -> dict[str, np.ndarray]:
    """Per split, ``(N,)`` group ids indexed by split row, checked against each pool's class names."""
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or column not in rows[0]:
        raise FewshotMedError(f"{path}: no column '{column}'; pass --column with the group column's name")
    groups: dict[str, np.ndarray] = {}
    for split, pool in pools.items():
        listed = {int(row["index_in_split"]): row for row in rows if row["split"] == split}
        size = max(listed) + 1 if listed else 0
        groups[split] = np.asarray(
            [listed[i][column] if i in listed else "" for i in range(size)], dtype=object
        )
        for row, label in zip(pool.indices, pool.labels, strict=True):
            if row not in listed or listed[row]["dx"] != pool.class_names[label]:
                raise FewshotMedError(
                    f"{path}: {split} row {row} is not listed as {pool.class_names[label]}; "
                    "the file does not describe this data"
                )
    return groups


def overlap(episodes: EpisodeList, groups: np.ndarray) -> tuple[float, float]:
    """``(share of queries, share of episodes)`` where a query's group is among its class's support groups.

    Args:
        episodes: ``E`` episodes, rows of the split ``groups`` describes.
        groups: ``(N,)`` group id of every split row.
    """
    twins, queries, touched = 0, 0, 0
    for episode in episodes.episodes:
        hits = 0
        for support, query in zip(episode.support, episode.query, strict=True):
            seen = {groups[row] for row in support}
            hits += sum(groups[row] in seen for row in query)
            queries += len(query)
        twins += hits
        touched += hits > 0
    return twins / queries, touched / len(episodes.episodes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("--groups", type=Path, required=True)
    parser.add_argument("--column", default="lesion_id")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    config = load_config(args.config, args.overrides)
    if not args.groups.is_file():
        raise SystemExit(f"error: --groups {args.groups} is not a file")
    data = load_data(config)
    pools = {split: data.subset(split, "novel") for split in ("val", "test")}
    try:
        groups = read_groups(args.groups, args.column, pools)
    except FewshotMedError as error:
        raise SystemExit(f"error: {error}") from None
    lists = draw_episodes(config, pools, len(data.roles.novel), val=True)
    shared = f"queries sharing a {args.column} with their class's support"
    print(f"| episodes | K | shots drawn | {shared} | episodes with one |")
    print("|---|---|---|---|---|")
    for split, by_k in (("val", lists.val or {}), ("test", lists.test)):
        for k, episodes in by_k.items():
            queries, touched = overlap(episodes, groups[split])
            print(f"| {split} | {k} | {episodes.k_shot} | {100 * queries:.1f}% | {100 * touched:.1f}% |")


if __name__ == "__main__":
    main()
