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
accuracy on the queries that have a twin in their support and on the others. A second table asks
whether the twins are why val temperatures are too small for the transductive methods: for each
transductive method of the config (its search chosen on val episodes, as the evaluate stage does) and
K, the val accuracy on twin and other queries, and the test pooled ECE after a temperature fitted on
all val queries (the pipeline's val temperature), on the val queries without a twin only, and on the
test queries themselves (not deployable: the floor of any single temperature).

Run: ``python -m benchmarks.scripts.episode_group_overlap configs/ham10000.yaml``
``--groups ${FEWSHOT_MED_DATA:-../shared/data}/ham10000_derma/split_index.csv [--column lesion_id]``
``[--from RUN [--methods simpleshot pt_map]]``
"""

from __future__ import annotations

import argparse
import csv
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import searched_results, transductive_frozen_methods
from fewshot_med.config import Config, load_config
from fewshot_med.data import ClassSubset, EpisodeList
from fewshot_med.errors import FewshotMedError
from fewshot_med.evaluation import evaluate_frozen
from fewshot_med.evaluation.calibration import TemperatureScaling
from fewshot_med.evaluation.metrics import pooled_ece, softmax
from fewshot_med.methods import MethodContext, create_method
from fewshot_med.pipelines.episodes import Episodes, draw_episodes
from fewshot_med.pipelines.evaluation import embed_subsets
from fewshot_med.pipelines.stages import from_run_stage, open_context


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
    features: torch.Tensor,
    methods_context: MethodContext,
    pool: ClassSubset,
    methods: list[str],
    episodes: dict[int, EpisodeList],
    groups: np.ndarray,
) -> dict[tuple[str, int], tuple[float, float]]:
    """``{(method, K): (accuracy on twin queries, on the others)}`` on the test episodes, each method at
    its defaults (uncalibrated); ``features`` and ``groups`` are the test pool's."""
    twins = {k: twin_mask(listed, groups) for k, listed in episodes.items()}
    scores = {}
    for method in methods:
        for k, listed in episodes.items():
            factory = partial(create_method, method, methods_context)
            results = evaluate_frozen(factory, features, pool, listed)
            correct = results.logits.argmax(axis=-1) == results.labels
            scores[method, k] = (float(correct[twins[k]].mean()), float(correct[~twins[k]].mean()))
    return scores


#: The query sets a temperature is fitted on, in the order of the second table's columns.
TEMPERATURE_FITS = ("all val queries", "val queries without a twin", "test queries")


@dataclass(frozen=True)
class TwinCalibration:
    """One row of the second table: a transductive method at one K, its val accuracy on twin and
    other queries (``None`` when there are none), and per fit in ``TEMPERATURE_FITS`` the fitted
    temperature and the test pooled ECE after it (``None`` when the fit has no queries)."""

    method: str
    k_shot: int
    val_twin_accuracy: float | None
    val_other_accuracy: float | None
    fits: dict[str, tuple[float, float] | None]

    def row(self) -> str:
        """The markdown row."""
        accuracy = " / ".join(
            "—" if value is None else f"{100 * value:.1f}%"
            for value in (self.val_twin_accuracy, self.val_other_accuracy)
        )
        cells = ["—" if fit is None else f"{fit[1]:.3f} ({fit[0]:.2f})" for fit in self.fits.values()]
        return f"| {self.method} | {self.k_shot} | {accuracy} | " + " | ".join(cells) + " |"


def temperature_by_twin(
    config: Config,
    features: dict[str, torch.Tensor],
    methods_context: MethodContext,
    pools: dict[str, ClassSubset],
    lists: Episodes,
    groups: dict[str, np.ndarray],
) -> list[TwinCalibration]:
    """The second table (see the module docstring), one entry per transductive method of ``config``
    and K; ``features``, ``pools`` and ``groups`` per split (``val``, ``test``)."""
    entries = []
    for method in transductive_frozen_methods(config):
        for k, test_list in lists.test.items():
            val_list = lists.val[k]
            _, test, val = searched_results(method, methods_context, features, pools, val_list, test_list)
            twins = twin_mask(val_list, groups["val"])
            correct = val.logits.argmax(axis=-1) == val.labels
            queries = {
                "all val queries": (val.logits, val.labels),
                "val queries without a twin": (val.logits[~twins][:, None], val.labels[~twins][:, None]),
                "test queries": (test.logits, test.labels),
            }
            fits: dict[str, tuple[float, float] | None] = {}
            for fit in TEMPERATURE_FITS:
                logits, labels = queries[fit]
                if labels.size == 0:
                    fits[fit] = None
                    continue
                temperature = TemperatureScaling(t_max=100.0).fit(logits, labels).temperature_
                fits[fit] = (temperature, pooled_ece(softmax(test.logits / temperature), test.labels)[0])
            entries.append(
                TwinCalibration(
                    method.display_name,
                    k,
                    float(correct[twins].mean()) if twins.any() else None,
                    float(correct[~twins].mean()) if (~twins).any() else None,
                    fits,
                )
            )
    return entries


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
    scores, calibration = {}, []
    if args.run_id:
        embedded = embed_subsets(from_run_stage(context, args.run_id))
        features, methods_context = {s: embedded.features[f"novel_{s}"] for s in pools}, embedded.methods
        scores = accuracy_by_twin(
            features["test"], methods_context, pools["test"], args.methods, lists.test, groups["test"]
        )
        calibration = temperature_by_twin(config, features, methods_context, pools, lists, groups)
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
    if calibration:
        print(
            "\n| method | K | val accuracy: twin / other queries | test ECE pooled (T): temperature "
            "fitted on all val queries | on val queries without a twin | on the test queries |"
        )
        print("|---|---|---|---|---|---|")
        print("\n".join(entry.row() for entry in calibration))


if __name__ == "__main__":
    main()
