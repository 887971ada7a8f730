import math

import numpy as np
import pytest
from scipy import stats

from fewshot_med.evaluation import mean_ci95, paired_difference_ci95, summarize


def test_mean_ci95_by_hand():
    values = np.array([0.61, 0.72, 0.55, 0.68, 0.70, 0.59, 0.64, 0.75, 0.66, 0.58])
    mean, half_width = mean_ci95(values)
    # t_{0.975, 9} = 2.262; half-width = t * s / sqrt(n)
    expected = 2.262 * values.std(ddof=1) / math.sqrt(10)
    assert mean == pytest.approx(values.mean())
    assert half_width == pytest.approx(expected, rel=1e-3)
    low, high = stats.t.interval(0.95, 9, loc=values.mean(), scale=stats.sem(values))
    assert half_width == pytest.approx((high - low) / 2)


def test_small_and_nan_inputs():
    assert mean_ci95([0.4]) == (0.4, 0.0)
    assert mean_ci95([1.0, float("nan"), 3.0]) == mean_ci95([1.0, 3.0])
    assert all(math.isnan(x) for x in mean_ci95([float("nan")]))
    assert all(math.isnan(x) for x in mean_ci95([]))


def test_paired_interval_is_narrower_on_correlated_data():
    rng = np.random.default_rng(0)
    difficulty = rng.normal(0.6, 0.15, size=600)  # shared by both methods on each episode
    a = difficulty + rng.normal(0.0, 0.02, size=600)
    b = difficulty + 0.03 + rng.normal(0.0, 0.02, size=600)
    diff, half_width = paired_difference_ci95(a, b)
    assert diff == pytest.approx(np.mean(a - b))
    assert abs(diff + 0.03) < half_width < 0.01
    unpaired = math.hypot(mean_ci95(a)[1], mean_ci95(b)[1])
    assert half_width < unpaired / 3
    with pytest.raises(ValueError, match="same episodes"):
        paired_difference_ci95(a, b[:-1])


def test_summarize():
    per_episode = {"accuracy": np.array([0.5, 0.7, 0.6]), "nll": [1.0, 0.8, 0.9]}
    summary = summarize(per_episode)
    assert list(summary) == ["accuracy", "nll"]
    assert summary["accuracy"] == mean_ci95([0.5, 0.7, 0.6])
    assert summarize({}) == {}
    with pytest.raises(ValueError, match="one value per episode"):
        summarize({"accuracy": [0.5, 0.6], "nll": [1.0]})
