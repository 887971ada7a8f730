"""Result tables: rows, markdown, CSV, best calibrator and paired differences."""

import csv
import io

import numpy as np
import pytest

from fewshot_med.evaluation import mean_ci95, paired_difference_ci95, score_episodes
from fewshot_med.evaluation.report import (
    best_calibration_table,
    markdown_table,
    paired_difference_table,
    summary_csv,
    summary_rows,
)


def _results(method, k_shot, n_episodes, scale, seed):
    rng = np.random.default_rng(seed)
    labels = np.tile(np.repeat(np.arange(3), 5), (n_episodes, 1))
    logits = scale * (np.eye(3)[labels] + rng.normal(size=(n_episodes, 15, 3)))
    return score_episodes(method, k_shot, logits, labels)


def test_rows_and_csv_carry_every_metric_with_its_interval():
    result = _results("simpleshot", 5, 12, 2.0, 0)
    (row,) = summary_rows([result])
    assert (row["method"], row["k_shot"], row["calibration"], row["episodes"]) == (
        "simpleshot",
        5,
        "none",
        12,
    )
    assert (row["accuracy"], row["accuracy_ci95"]) == mean_ci95(result.values("accuracy"))
    assert row["ece_pooled"] > 0 and "aurc" in row and "accuracy_at_coverage" in row
    parsed = list(csv.DictReader(io.StringIO(summary_csv([result]))))
    assert float(parsed[0]["nll"]) == pytest.approx(row["nll"])


def test_markdown_shows_the_calibration_column_only_when_calibrated():
    raw = _results("simpleshot", 5, 8, 2.0, 0)
    assert "calibration" not in markdown_table([raw]).splitlines()[0]
    scaled = raw.with_logits(raw.logits / 3.0, "val_temperature", {"temperature": 3.0})
    table = markdown_table([raw, scaled])
    assert "| calibration |" in table.splitlines()[0]
    accuracy = 100 * raw.summary()["accuracy"][0]
    assert f"| simpleshot | 5 | val_temperature | 8 | {accuracy:.1f} ±" in table  # accuracy unchanged


@pytest.mark.parametrize("metric", ["ece_pooled", "ece"])
def test_best_calibration_is_the_lowest_ece(metric):
    raw = _results("logreg", 1, 10, 8.0, 1)  # over-confident
    hotter = raw.with_logits(raw.logits / 4.0, "val_temperature", {})
    colder = raw.with_logits(raw.logits * 4.0, "loo_temperature", {})
    means = {r.calibration: r.summary()[metric][0] for r in (raw, hotter, colder)}
    best = min(means, key=means.get)
    assert best == "val_temperature"  # dividing over-confident logits helps
    line = best_calibration_table([raw, hotter, colder], metric).splitlines()[2]
    assert line.startswith(f"| logreg | 1 | {best} | {means[best]:.3f}")


def test_paired_differences_against_the_first_method_on_common_episodes():
    first, second = _results("a", 5, 10, 1.0, 2), _results("b", 5, 6, 3.0, 3)
    table = paired_difference_table([first, second])
    mean, half = paired_difference_ci95(second.values("accuracy"), first.values("accuracy")[:6])
    assert f"| b | 5 | a | 6 | {100 * mean:+.1f} ± {100 * half:.1f} |" in table
