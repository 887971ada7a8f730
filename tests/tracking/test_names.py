"""The naming contract: the builders write today's names, a tiny pipeline writes nothing the contract does
not define, and the readers (review, results table) find what the writers wrote."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from fewshot_med import tracking
from fewshot_med.config import Config
from fewshot_med.evaluation import GENERALISED_METRICS, METRICS
from fewshot_med.pipelines.transfer import run_stages
from fewshot_med.tracking import names

ROOT = Path(__file__).resolve().parents[2]


def test_builders_write_the_documented_names():
    assert names.test_metric(5, "protonet", "val_temperature", "accuracy") == (
        "test.5shot.protonet.val_temperature.accuracy"
    )
    assert names.test_metric(1, None, names.UNCALIBRATED, names.ci95("ece")) == "test.1shot.ece_ci95"
    assert names.test_metric(1, "ft (head)", names.UNCALIBRATED, "nll") == "test.1shot.ft _head_.nll"
    assert names.generalised_metric(5, None, "harmonic_mean") == "generalised.5shot.harmonic_mean"
    assert names.calibration_metric(10, "val_temperature", "temperature") == (
        "calibration.10shot.val_temperature.temperature"
    )
    assert names.stage_metric(names.PRETRAIN, "best_epoch") == "pretrain.best_epoch"
    assert names.time_metric(names.META_TRAIN) == "time.meta_train_seconds"
    assert names.select_metric(2, "clml", "dataset_gap") == "select.2shot.clml.dataset_gap"
    assert names.select_metric(2, None, "best_accuracy") == "select.2shot.best_accuracy"
    assert names.val_metric(5, "accuracy") == "val.5shot.accuracy"
    assert names.benchmark_metric("pbc", 1, names.ci95("delta_accuracy")) == "pbc.1shot.delta_accuracy_ci95"
    assert names.version_tag("fewshot-med") == "version.fewshot_med"
    assert names.method_stage("ft_head") == "method:ft_head"
    assert names.plot_path(names.RELIABILITY, 5) == "plots/reliability_5shot.png"
    assert names.plot_paths(names.PIPELINE_PLOTS, [5, 1]) == [
        (names.ACCURACY_VS_SHOTS, None, "plots/accuracy_vs_shots.png"),
        (names.RISK_COVERAGE, 1, "plots/risk_coverage_1shot.png"),
        (names.RISK_COVERAGE, 5, "plots/risk_coverage_5shot.png"),
    ]
    assert names.episodes_path("val", 10) == "episodes/val_10shot.json"
    assert names.per_episode_path(5, names.UNCALIBRATED) == "per_episode/test_5shot.csv"
    assert names.per_episode_path(5, "loo_temperature") == "per_episode/test_5shot_loo_temperature.csv"
    assert names.selection_scores_path(2) == "selection/2shot_scores.csv"
    assert names.dataset_artifact("selection", "pbc", "csv", 5) == "selection_pbc_5shot.csv"
    assert names.list_items(names.list_value([1, 5])) == ["1", "5"] and names.list_items(None) == []


def test_names_and_the_results_table_import_no_mlflow():
    for module in ("fewshot_med.tracking.names", "benchmarks.scripts.results_table"):
        code = f"import sys, {module}; sys.exit('mlflow' in sys.modules)"
        assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0, module


def _artifact_files(client: MlflowClient, run_id: str, folder: str | None = None) -> list[str]:
    found = []
    for item in client.list_artifacts(run_id, folder):
        found += _artifact_files(client, run_id, item.path) if item.is_dir else [item.path]
    return found


@pytest.mark.slow
def test_a_pipeline_tree_holds_contract_names_only_and_the_readers_find_them(
    tmp_path, tiny_pipeline, monkeypatch
):
    store = tmp_path / "mlruns"
    searched = {"name": "bd_cspn", "search": {"features": ["l2", "power"]}}  # transductive, val search
    config = Config.model_validate(
        {
            **tiny_pipeline,
            "methods": [*tiny_pipeline["methods"], searched],
            "selection": {"features": ["l2"], "prior_precision": [1.0, 10.0], "orderings": 2},
            "tracking": {"tracking_uri": str(store), "registered_model": "tiny-names"},
            "runtime": {"output_dir": str(tmp_path / "outputs")},
        }
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        outcome = run_stages(config, ("pretrain", "meta_train", "evaluate", "select"))
    finally:
        torch.set_num_threads(threads)
    vocabulary = names.Vocabulary(
        shots=tuple(config.episodes.shots),
        methods=(*(method.display_name for method in config.methods), names.ORACLE),
        calibrations=tuple(config.evaluation.calibration),
        metrics=(*METRICS, "accuracy_at_coverage", "ece_pooled"),
        generalised_metrics=GENERALISED_METRICS,
        criteria=tuple(config.selection.criteria),
        alias=config.tracking.model_alias,
        config_paths=frozenset(tracking.flatten_params(config.model_dump(mode="json"))),
    )

    client = MlflowClient(tracking.store_uri(config.tracking))
    experiment = client.get_experiment(client.get_run(outcome.run_id).info.experiment_id)
    assert experiment.tags[names.EXPERIMENT_KIND_TAG] == names.EXPERIMENT_KIND
    runs = {run.data.tags.get(names.STAGE_TAG): run for run in client.search_runs([experiment.experiment_id])}
    methods = [names.method_stage(label) for label in vocabulary.methods]
    assert set(runs) == {None, *names.STAGES, *methods}
    undefined = []
    for stage, run in runs.items():
        written = {
            "metric": run.data.metrics,
            "tag": [key for key in run.data.tags if not key.startswith("mlflow.")],  # MLflow's own
            "param": run.data.params,
            "artifact": _artifact_files(client, run.info.run_id),
        }
        undefined += [
            (stage, kind, name)
            for kind, found in written.items()
            for name in found
            if not names.is_defined(kind, name, stage, vocabulary)
        ]
    assert undefined == []
    assert not names.is_defined(
        "metric", "test.5shot.simpleshot.accuracy", names.method_stage("x"), vocabulary
    )
    # the search's choice and every method's val-episode scores are on the runs, under contract names
    pipeline, bd_cspn = runs[None].data, runs[names.method_stage("bd_cspn")]
    for k in vocabulary.shots:
        assert pipeline.params[names.search_param(k, "features", "bd_cspn")] in {"l2", "power"}
        assert bd_cspn.data.params[names.search_param(k, "features")] in {"l2", "power"}
        assert names.search_path(k) in _artifact_files(client, bd_cspn.info.run_id)
        for label in ("simpleshot", "bd_cspn"):
            assert 0 <= pipeline.metrics[names.val_metric(k, "accuracy", label)] <= 1
    # a transductive method is never the registered classifier
    assert runs[names.REGISTER].data.tags[names.METHOD_TAG] != "bd_cspn"
    assert not names.is_defined("artifact", "plots/reliability_5shot.png", None, vocabulary)

    # the review finds every plot, calibrator fit and training summary the writers logged
    review = tracking.collect_run(outcome.run_id, tmp_path / "review", config.tracking)
    assert (review.methods, review.shots) == (list(vocabulary.methods), list(vocabulary.shots))
    assert review.calibrations == list(vocabulary.calibrations)
    sections = {None: "Across methods"} | {
        stage: f"Method: {label}" for stage, label in zip(methods, vocabulary.methods, strict=True)
    }
    for stage, section in sections.items():
        logged = [
            Path(path).name for path in _artifact_files(client, runs[stage].info.run_id, names.PLOTS_DIR)
        ]
        shown = [plot.path.name for plot in review.plots if plot.section == section]
        assert sorted(shown) == sorted(logged) and logged, section
    fits = {
        (label, names.calibration_metric(fit.k_shot, fit.calibrator, param))
        for fit in review.calibration
        for label in [fit.method]
        for param in fit.params
    }
    logged_fits = {
        (label, key)
        for stage, label in zip(methods, vocabulary.methods, strict=True)
        for key in runs[stage].data.metrics
        if key.startswith("calibration.")
    }
    assert fits == logged_fits and fits
    assert set(review.training) == set(tracking.review.TRAINING_METRICS)

    # the results table reads the same run through the tracking package
    from benchmarks.scripts.results_table import section

    monkeypatch.setenv("MLFLOW_TRACKING_URI", str(store))
    experiment_name, text = section(outcome.run_id)
    assert experiment_name == "tiny" and f"MLflow run `{outcome.run_id}`" in text
    for label in vocabulary.methods:
        for k in vocabulary.shots:
            assert f"| {label} | {k} | " in text
    assert "wall time on this machine: pretrain " in text and "select " in text
