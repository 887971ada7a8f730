"""How often a query shares its lesion (or patient) with a support image of its own class.

HAM10000 holds several images of one lesion (``split_index.csv``: ``lesion_id``). Its splits are
grouped by lesion, so no lesion crosses splits, but inside one split an episode may draw a support
image and a query of the same lesion: a near-duplicate that makes the query easy. For a config, this
draws the pipeline's val and test episode lists (``draw_episodes``, the config's seed) and reports per
list and K the share of queries whose group is among the support groups of their class, and the share
of episodes with at least one such query. The groups come from a CSV with columns ``split``,
``index_in_split`` (the row in the split's arrays), ``dx`` (the class name, checked against the data)
and the group column. Nothing is trained; it takes seconds.

With ``--from RUN``, the run's backbone (read over the config's test-time views) also scores the test
episodes with each of ``--methods`` (default hyperparameters, uncalibrated), and the table adds the
accuracy on the queries that have a twin in their support and on the others.

Run: ``python -m benchmarks.scripts.episode_group_overlap configs/ham10000.yaml``
``--groups ${FEWSHOT_MED_DATA:-../shared/data}/ham10000_derma/split_index.csv [--column lesion_id]``
``[--from RUN [--methods simpleshot pt_map]]``
"""

from __future__ import annotations

import argparse
import csv
from functools import partial
from pathlib import Path

import numpy as np

from fewshot_med.config import load_config
from fewshot_med.data import ClassSubset, EpisodeList
from fewshot_med.errors import FewshotMedError
from fewshot_med.evaluation import evaluate_frozen
from fewshot_med.methods import create_method
from fewshot_med.models import embed
from fewshot_med.pipelines.episodes import draw_episodes
from fewshot_med.pipelines.stages import StageContext, from_run_stage, open_context


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


def twin_mask(episodes: EpisodeList, groups: np.ndarray) -> np.ndarray:
    """``(E, n_way * n_query)`` bool, in ``query_rows`` order: the query's group is among the groups of
    its own class's support images.

    Args:
        episodes: ``E`` episodes, rows of the split ``groups`` describes.
        groups: ``(N,)`` group id of every split row.
    """
    mask = []
    for episode in episodes.episodes:
        row = []
        for support, query in zip(episode.support, episode.query, strict=True):
            seen = {groups[index] for index in support}
            row.extend(groups[index] in seen for index in query)
        mask.append(row)
    return np.asarray(mask, dtype=bool)


def overlap(episodes: EpisodeList, groups: np.ndarray) -> tuple[float, float]:
    """``(share of queries, share of episodes)`` with a query whose group is among its class's support
    groups (``twin_mask``)."""
    mask = twin_mask(episodes, groups)
    return float(mask.mean()), float(mask.any(axis=1).mean())


def accuracy_by_twin(
    context: StageContext, methods: list[str], episodes: dict[int, EpisodeList], groups: np.ndarray
) -> dict[tuple[str, int], tuple[float, float]]:
    """``{(method, K): (accuracy on twin queries, on the others)}`` on the test episodes, with the
    context's backbone read over ``evaluation.test_time_views`` and each method at its defaults
    (uncalibrated); ``groups`` are the test split's."""
    backbone, spec = context.trained()
    batch = context.config.evaluation.batch_size
    pool = context.data.subset("test", "novel")
    features = embed(backbone, pool.images, spec, context.device, batch)
    base = embed(backbone, context.data.subset("train", "base").images, spec, context.device, batch)
    method_context = context.method_context(base.mean(dim=0))
    twins = {k: twin_mask(listed, groups) for k, listed in episodes.items()}
    scores = {}
    for method in methods:
        for k, listed in episodes.items():
            results = evaluate_frozen(partial(create_method, method, method_context), features, pool, listed)
            correct = results.logits.argmax(axis=-1) == results.labels
            scores[method, k] = (float(correct[twins[k]].mean()), float(correct[~twins[k]].mean()))
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("--groups", type=Path, required=True)
    parser.add_argument("--column", default="lesion_id")
    parser.add_argument("--from", dest="run_id")
    parser.add_argument("--methods", nargs="+", default=["simpleshot", "pt_map"])
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    config = load_config(args.config, args.overrides)
    if not args.groups.is_file():
        raise SystemExit(f"error: --groups {args.groups} is not a file")
    context = open_context(config)
    pools = {split: context.data.subset(split, "novel") for split in ("val", "test")}
    try:
        groups = read_groups(args.groups, args.column, pools)
    except FewshotMedError as error:
        raise SystemExit(f"error: {error}") from None
    lists = draw_episodes(config, pools, context.n_way, val=True)
    scores = {}
    if args.run_id:
        scores = accuracy_by_twin(
            from_run_stage(context, args.run_id), args.methods, lists.test, groups["test"]
        )
    shared = f"queries sharing a {args.column} with their class's support"
    scored = args.methods if scores else []
    columns = [f"{method}: twin / other queries" for method in scored]
    print(
        f"| episodes | K | shots drawn | {shared} | episodes with one |{''.join(f' {c} |' for c in columns)}"
    )
    print("|---|---|---|---|---|" + "---|" * len(columns))
    for split, by_k in (("val", lists.val or {}), ("test", lists.test)):
        for k, episodes in by_k.items():
            queries, touched = overlap(episodes, groups[split])
            cells = [
                f"{100 * scores[m, k][0]:.1f}% / {100 * scores[m, k][1]:.1f}%" if split == "test" else "—"
                for m in scored
            ]
            line = f"| {split} | {k} | {episodes.k_shot} | {100 * queries:.1f}% | {100 * touched:.1f}% |"
            print(line + "".join(f" {cell} |" for cell in cells))


if __name__ == "__main__":
    main()
