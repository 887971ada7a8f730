"""``fewshot-med report``: a tiny pipeline run, reported as self-contained HTML and as markdown."""

from __future__ import annotations

import base64
import dataclasses
import re
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple
from urllib.parse import unquote

import pytest
import torch
from mlflow import MlflowClient

from fewshot_med import tracking
from fewshot_med.cli import main
from fewshot_med.config import Config, TrackingConfig
from fewshot_med.errors import FewshotMedError
from fewshot_med.pipelines.transfer import run_stages
from fewshot_med.reporting.html_report import render_html, write_report
from fewshot_med.tracking import RunReview, collect_run
from fewshot_med.tracking.review import _training_summary

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
METHOD_PLOTS = [f"{kind}_{k}shot.png" for kind in ("reliability", "confusion") for k in (1, 5)]


class TinyRun(NamedTuple):
    root: Path
    settings: TrackingConfig
    run_id: str
    review: RunReview


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_pipeline) -> TinyRun:
    """One tracked pipeline run in a store of its own (no chdir: the store and outputs are absolute)."""
    root = tmp_path_factory.mktemp("report")
    torch.set_num_threads(1)
    settings = TrackingConfig(tracking_uri=str(root / "mlruns"))
    config = Config.model_validate(
        {**tiny_pipeline, "tracking": settings.model_dump(), "runtime": {"output_dir": str(root / "outputs")}}
    )
    run_id = run_stages(config).run_id
    return TinyRun(root, settings, run_id, collect_run(run_id, root / "review", settings))


def test_collect_run_gathers_lineage_results_calibrators_and_ordered_plots(tiny):
    review = tiny.review
    assert review.run_id == tiny.run_id and review.status == "FINISHED"
    assert (review.config_name, review.experiment_name, review.dataset) == ("tiny", "tiny", "demo")
    assert len(review.data_digest) == 64 and review.git_commit and review.seed == "0"
    assert review.backbone == "resnet10t" and review.stages == "pretrain,meta_train,evaluate"
    assert review.duration is not None and review.duration.total_seconds() > 0
    assert review.methods == ["simpleshot", "ft_head", "oracle"]
    assert 0 <= review.training["pretrain.best_val_balanced_accuracy"] <= 1
    assert review.training["pretrain.best_epoch"] == 1 and "meta_train.best_val_accuracy" in review.training
    assert review.results_markdown.startswith("| method | K |")
    assert review.config_yaml.read_text().startswith("name: tiny")
    assert review.results_csv.read_text().startswith("method,k_shot,calibration")

    fits = {(fit.method, fit.k_shot, fit.calibrator): fit.params for fit in review.calibration}
    assert 0.05 <= fits["simpleshot", 5, "val_temperature"]["temperature"] <= 100
    assert next(iter(fits["simpleshot", 5, "val_temperature"])) == "temperature"
    assert "temperature_median" in fits["simpleshot", 5, "loo_temperature"]
    assert ("simpleshot", 1, "loo_temperature") not in fits and ("oracle", 1, "val_temperature") in fits

    layout = [(plot.section, plot.path.name) for plot in review.plots]
    assert layout[:3] == [
        ("Across methods", "accuracy_vs_shots.png"),
        ("Across methods", "risk_coverage_1shot.png"),
        ("Across methods", "risk_coverage_5shot.png"),
    ]
    generalised = [f"generalised_confusion_{k}shot.png" for k in (1, 5)]
    assert [name for section, name in layout if section == "Method: simpleshot"] == METHOD_PLOTS + generalised
    assert [name for section, name in layout if section == "Method: ft_head"] == METHOD_PLOTS
    assert [section for section, _ in layout][-1] == "Method: oracle"
    for plot in review.plots:
        assert plot.path.is_file() and plot.path.is_relative_to(tiny.root / "review") and plot.caption


def test_html_report_is_self_contained(tiny, tmp_path):
    review = tiny.review
    out = write_report(review, tmp_path / "report.html", "html")
    html = out.read_text(encoding="utf-8")
    assert out == tmp_path / "report.html" and list(tmp_path.iterdir()) == [out]
    assert html.count("<table>") >= 4  # results, best calibration, generalised, calibrators
    assert "<td>simpleshot</td>" in html and "loo_temperature" in html and "temperature_median" in html
    assert html.count('src="data:image/png;base64,') == len(review.plots) == 17
    for plot in review.plots:
        assert base64.b64encode(plot.path.read_bytes()).decode() in html
        assert plot.caption in html
    for fragment in (review.run_id, review.data_digest, review.git_commit, "resnet10t", "tiny", "seed"):
        assert fragment in html
    assert review.start_time.strftime("%Y-%m-%d") in html
    assert not re.search(r'(src|href)="(?!data:)', html) and "<script" not in html and "<link" not in html


def test_html_report_escapes_what_the_run_recorded(tiny):
    review = dataclasses.replace(tiny.review, run_name="<script>x</script>", config_name="a&b")
    html = render_html(review)
    assert "<script" not in html and "&lt;script&gt;x&lt;/script&gt;" in html and "a&amp;b" in html


def test_markdown_report_copies_the_plots_and_its_links_resolve(tiny, tmp_path):
    review = tiny.review
    out = write_report(review, tmp_path / "my report.md", "md")
    text = out.read_text(encoding="utf-8")
    folder = tmp_path / "my report_files"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["my report.md", "my report_files"]
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert len(links) == len(review.plots) == len(list(folder.iterdir()))
    for link, plot in zip(links, review.plots, strict=True):
        target = out.parent / unquote(link)
        assert target.parent == folder and target.read_bytes() == plot.path.read_bytes()
    assert review.results_markdown.strip() in text
    for fragment in (review.run_id, review.data_digest, review.git_commit, "```yaml"):
        assert fragment in text


def test_stage_and_method_run_ids_lead_to_the_same_report(tiny, tmp_path):
    evaluate = tracking.find_stage_run(tiny.run_id, "evaluate", tiny.settings)
    method = tracking.find_stage_run(evaluate, "method:ft_head", tiny.settings)
    pretrain = tracking.find_stage_run(tiny.run_id, "pretrain", tiny.settings)
    for run_id in (evaluate, method, pretrain):
        review = collect_run(run_id, tmp_path / run_id, tiny.settings)
        assert review.run_id == tiny.run_id and review.evaluate_run_id == evaluate
        assert [plot.path.name for plot in review.plots] == [plot.path.name for plot in tiny.review.plots]


def test_runs_without_evaluation_and_missing_stores_are_refused(tiny, tmp_path, tiny_pipeline):
    config = Config.model_validate({**tiny_pipeline, "tracking": tiny.settings.model_dump()})
    with tracking.pipeline_run(config, run_name="nothing", tags={"from_run": tiny.run_id}) as run:
        pass
    with pytest.raises(FewshotMedError, match="has no finished evaluation: pass the id of a pipeline run"):
        collect_run(run.run_id, tmp_path, tiny.settings)
    # a run that started from an earlier run's backbone reports that run's training summary
    client = MlflowClient(tracking.store_uri(tiny.settings))
    assert _training_summary(client, client.get_run(run.run_id)) == tiny.review.training
    with pytest.raises(FewshotMedError, match=r"no MLflow store at .*: pass --tracking-uri"):
        collect_run(tiny.run_id, tmp_path, TrackingConfig(tracking_uri=str(tmp_path / "elsewhere")))
    assert not (tmp_path / "elsewhere").exists()


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", "from fewshot_med.cli import main; main()", *args]
    env = {"COLUMNS": "200", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=env, timeout=300)


def test_cli_writes_the_report_and_prints_its_path(tiny, tmp_path):
    result = _cli("report", tiny.run_id, "--tracking-uri", str(tiny.root / "mlruns"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = tmp_path / f"report_{tiny.run_id[:8]}.html"
    assert result.stdout.strip() == out.name and out.is_file()
    assert out.read_text(encoding="utf-8").count("data:image/png;base64,") == len(tiny.review.plots)
    assert [path.name for path in tmp_path.iterdir()] == [out.name]  # the downloads were temporary


def test_cli_unknown_run_is_a_one_line_error(tiny, tmp_path, monkeypatch, capsys):
    # in-process through the console script's entry point (a subprocess costs seconds of imports)
    monkeypatch.chdir(tmp_path)
    store = str(tiny.root / "mlruns")
    monkeypatch.setattr(sys, "argv", ["fewshot-med", "report", "0123456789abcdef", "--tracking-uri", store])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no MLflow run '0123456789abcdef'"), lines
    assert "pass the id of a pipeline run" in lines[0]
    assert not list(tmp_path.iterdir())
