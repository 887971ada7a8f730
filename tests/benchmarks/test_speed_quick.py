"""The speed suite in quick mode on the real 28 px HAM10000 file: the report is complete and consistent."""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # benchmarks/ is a folder of the checkout, not an installed package
    sys.path.insert(0, str(REPO))

from benchmarks.common import SuiteOptions, SuiteReport  # noqa: E402
from benchmarks.suites import speed  # noqa: E402

HEADLINES = (
    "speed.pretrain.bare_first_images_per_s",
    "speed.pretrain.ours_images_per_s",
    "speed.pretrain.bare_second_images_per_s",
    "speed.pretrain.bare_images_per_s",
    "speed.pretrain.ratio",
    "speed.eval.forward_s",
    "speed.eval.ours_s",
    "speed.eval.easyfsl_s",
    "speed.eval.speedup",
    "speed.tracking.pretrain.off_s",
    "speed.tracking.pretrain.on_s",
    "speed.tracking.pretrain.ratio",
    "speed.memory.pretrain_bare_gib",
    "speed.memory.pretrain_ours_gib",
    "speed.memory.eval_ours_gib",
    "speed.memory.eval_easyfsl_gib",
    "speed.memory.tracking_on_gib",
)


@pytest.fixture(scope="module")
def report(shared_data: Path) -> SuiteReport:
    """One quick run of the suite, shared by the tests of this module (about 95 s on one core)."""
    if not (shared_data / "ham10000_derma" / "ham10000_derma_28.npz").is_file():
        pytest.skip(f"the 28 px HAM10000 file is not under {shared_data / 'ham10000_derma'}")
    pytest.importorskip("easyfsl", reason="the speed suite compares with easyfsl: pip install -e .[bench]")
    return speed.run(SuiteOptions(quick=True, threads=1))


@pytest.mark.slow
@pytest.mark.real_data
def test_markdown_is_a_section_with_tables(report: SuiteReport) -> None:
    assert report.markdown.startswith("## Speed\n")
    for heading in ("Pretraining throughput", "Evaluating 20 episodes", "Peak memory", "MLflow overhead"):
        assert f"### {heading}" in report.markdown
    assert re.search(r"^\|---", report.markdown, flags=re.MULTILINE)  # a markdown table separator
    assert "Quick run" in report.markdown


@pytest.mark.slow
@pytest.mark.real_data
def test_metrics_are_present_positive_and_consistent(report: SuiteReport) -> None:
    metrics = report.metrics
    assert set(HEADLINES) <= set(metrics)
    assert all(isinstance(v, float) and math.isfinite(v) and v > 0 for v in metrics.values())
    first, second = (metrics[f"speed.pretrain.bare_{run}_images_per_s"] for run in ("first", "second"))
    bare, ours = (first + second) / 2, metrics["speed.pretrain.ours_images_per_s"]
    assert metrics["speed.pretrain.bare_images_per_s"] == pytest.approx(bare)
    assert metrics["speed.pretrain.ratio"] == pytest.approx(ours / bare)
    assert metrics["speed.eval.speedup"] == pytest.approx(
        metrics["speed.eval.easyfsl_s"] / metrics["speed.eval.ours_s"]
    )
    assert metrics["speed.eval.ours_s"] >= metrics["speed.eval.forward_s"] * 0.5  # ours embeds the pool too
    assert metrics["speed.tracking.pretrain.ratio"] == pytest.approx(
        metrics["speed.tracking.pretrain.on_s"] / metrics["speed.tracking.pretrain.off_s"]
    )
    assert "speed.tracking.pipeline.ratio" not in metrics  # the pipeline is measured in full mode only
    assert report.tables["speed.csv"].startswith("metric,value\n")


@pytest.mark.slow
@pytest.mark.real_data
def test_markdown_ratio_is_ours_over_the_bare_runs_it_shows(report: SuiteReport) -> None:
    def cell(row: str) -> float:
        match = re.search(rf"^\| {re.escape(row)} \| \**([0-9.]+)\** \|$", report.markdown, re.MULTILINE)
        assert match, row
        return float(match.group(1))

    bare = (cell("bare PyTorch loop") + cell("bare PyTorch loop, again")) / 2
    ratio = cell("**ratio ours / mean of the two bare runs**")
    assert ratio == pytest.approx(cell("fewshot-med `pretrain`") / bare, abs=0.02)


@pytest.mark.slow
@pytest.mark.real_data
def test_record_names_the_data_and_settings(report: SuiteReport) -> None:
    assert re.fullmatch(r"[0-9a-f]{64}", report.record["speed.data_digest"])
    assert re.fullmatch(r"[0-9a-f]{64}", report.record["speed.episode_digest"])
    assert report.record["speed.dataset"] == "ham10000-28"
    assert report.record["speed.quick"] == "True"
    assert report.record["speed.torch_threads"] == "1"
    assert all(isinstance(value, str) for value in report.record.values())
