"""The one place a run's episodes are drawn: the evaluation, the select stage, the ``episodes`` command and
every benchmark suite call ``draw_episodes``, so they all see the identical seeded lists.

Test episodes come from the novel classes of the test split for every K of ``episodes.shots``, with
class-imbalanced queries when ``episodes.query_dirichlet_alpha`` is set; val episodes (for the val-episode
temperature) from the novel classes of the val split, always balanced, with K capped by what the split
holds (``validation_shots``).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from fewshot_med import tracking
from fewshot_med.config import Config
from fewshot_med.data import ClassSubset, EpisodeList, sample_episodes
from fewshot_med.errors import FewshotMedError
from fewshot_med.tracking import names


@dataclass(frozen=True)
class Episodes:
    """The fixed episode lists of a run, per K: test, and val (for calibration; ``None`` if not drawn)."""

    test: dict[int, EpisodeList]
    val: dict[int, EpisodeList] | None


def validation_shots(pool: ClassSubset, k_shot: int) -> int:
    """Shots of the val episodes that stand in for ``k_shot``: ``k_shot``, capped so that the smallest
    val class keeps at least as many queries as shots (HAM10000's val split has 10 df images, so
    K = 10 is calibrated on 5-shot val episodes)."""
    smallest = int(np.bincount(pool.labels, minlength=len(pool.class_names)).min())
    if smallest < 2:
        raise FewshotMedError(
            f"val episodes need 2 images per class, but the {pool.split} split holds {smallest} image(s) of "
            f"a novel class {list(pool.class_names)}; remove val_temperature from evaluation.calibration or "
            "give the split more images"
        )
    return min(k_shot, smallest // 2)


def draw_episodes(
    config: Config,
    pools: dict[str, ClassSubset],
    n_way: int,
    shots: Sequence[int] | None = None,
    val: bool | None = None,
    query_dirichlet_alpha: float | Literal["config"] | None = "config",
) -> Episodes:
    """The seeded episode lists of a run.

    Args:
        config: its ``episodes`` section gives the queries per class, the numbers of episodes, the seed
            and the test queries' Dirichlet imbalance.
        pools: ``{"test": ..., "val": ...}``, the novel-class images of the test and val splits.
        n_way: classes per episode.
        shots: the K values; ``episodes.shots`` when ``None``.
        val: draw the val episodes too; when ``None``, only if ``evaluation.calibration`` has
            ``val_temperature`` (the one user of val episodes).
        query_dirichlet_alpha: the test episodes' query imbalance (``sample_episodes``; Veilleux et al.,
            NeurIPS 2021): ``"config"`` for ``episodes.query_dirichlet_alpha``, ``None`` for balanced, or an
            alpha, so a benchmark can draw imbalanced lists from a balanced config. Val episodes are
            always balanced: they calibrate and choose, and should not carry one draw's class skew.

    Returns:
        ``Episodes`` with a test list (and a val list) per K. Episode *i* depends only on the seed and *i*.
    """
    protocol = config.episodes
    shots = list(protocol.shots if shots is None else shots)
    if query_dirichlet_alpha == "config":
        query_dirichlet_alpha = protocol.query_dirichlet_alpha
    test = {
        k: sample_episodes(
            pools["test"],
            n_way,
            k,
            protocol.n_query,
            protocol.n_test_episodes,
            protocol.seed,
            query_dirichlet_alpha,
        )
        for k in shots
    }
    if val is None:
        val = "val_temperature" in config.evaluation.calibration
    if not val:
        return Episodes(test, None)
    val_pool = pools["val"]
    val_lists = {
        k: sample_episodes(
            val_pool,
            n_way,
            validation_shots(val_pool, k),
            protocol.n_query,
            protocol.n_val_episodes,
            protocol.seed,
        )
        for k in shots
    }
    return Episodes(test, val_lists)


def check_saved_episodes(episodes: Episodes, from_run: str, config: Config) -> str:
    """Check that ``episodes.test`` are the very lists the evaluation of ``from_run`` saved, so numbers
    computed here are on that run's episodes; returns a sentence saying where the episodes come from.

    Raises:
        FewshotMedError: a saved list differs (another config or seed).
    """
    source = f"drawn with seed {config.episodes.seed}"
    with tempfile.TemporaryDirectory(prefix="fewshot-med-episodes-") as folder:
        for k, drawn in episodes.test.items():
            path = tracking.download_stage_artifact(
                from_run, names.EVALUATE, names.episodes_path("test", k), Path(folder), config.tracking
            )
            if path is None:
                return f"{source} (run `{from_run}` saved none)"
            saved = json.loads(path.read_text(encoding="utf-8"))
            saved.pop("format_version", None)  # runs before format-versioned artifacts lack it
            expected = {key: value for key, value in drawn.to_dict().items() if key != "format_version"}
            if saved != json.loads(json.dumps(expected)):
                raise FewshotMedError(
                    f"the {k}-shot test episodes saved by run {from_run} differ from those this config draws "
                    f"(seed {config.episodes.seed}); pass a run of the same config and seed to --from"
                )
    return f"{source}, identical to those saved by run `{from_run}`"
