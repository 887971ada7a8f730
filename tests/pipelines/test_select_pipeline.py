"""``fewshot-med select`` end to end: the study on the run's test episodes, and what MLflow holds."""

import csv
import io
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from fewshot_med.config import Config
from fewshot_med.pipelines.transfer import run_stages


@pytest.mark.slow
def test_select_stage_scores_every_candidate_and_logs_the_study(workdir, tiny_pipeline):
    settings = {
        **tiny_pipeline,
        "meta_train": {"enabled": False},
        "episodes": {**tiny_pipeline["episodes"], "shots": [1, 2], "n_test_episodes": 6},
        "selection": {"features": ["l2", "centred"], "prior_precision": [0.1, 10.0], "orderings": 3},
    }
    outcome = run_stages(Config.model_validate(settings), ("pretrain", "select"))
    assert outcome.report is None and [r.k_shot for r in outcome.selection.per_k] == [1, 2]
    study = outcome.selection.per_k[1]
    assert [c.label for c in study.candidates] == ["l2, λ=0.1", "l2, λ=10", "centred, λ=0.1", "centred, λ=10"]
    assert set(study.scores) == {"clml", "lml", "loo", "train_loss"}
    assert study.accuracy.shape == (4, 6) and all(s.shape == (4, 6) for s in study.scores.values())
    for outcome_ in study.outcomes:
        picked = study.accuracy[outcome_.dataset_pick]
        assert outcome_.dataset_pick_accuracy[0] == pytest.approx(picked.mean())
        assert outcome_.dataset_gap[0] == pytest.approx(picked.mean() - study.accuracy[study.best].mean())
        assert outcome_.dataset_gap[0] <= 1e-9 and -1 <= outcome_.rank_correlation <= 1

    client = MlflowClient(f"sqlite:///{workdir}/mlruns/mlflow.db")
    children = client.search_runs(
        [client.get_run(outcome.run_id).info.experiment_id],
        f"tags.mlflow.parentRunId = '{outcome.run_id}' and tags.stage = 'select'",
    )
    assert len(children) == 1
    select_run = children[0]
    metrics = select_run.data.metrics
    assert metrics["select.2shot.clml.dataset_pick_accuracy"] == pytest.approx(
        study.outcomes[0].dataset_pick_accuracy[0]
    )
    assert metrics["select.2shot.best_accuracy"] == pytest.approx(study.accuracy[study.best].mean())
    assert select_run.data.params["orderings"] == "3"
    path = client.download_artifacts(select_run.info.run_id, "selection/2shot_scores.csv", str(workdir))
    rows = list(csv.DictReader(io.StringIO(Path(path).read_text())))
    assert len(rows) == 4 * 6
    assert np.isclose(float(rows[0]["test_accuracy"]), study.accuracy[0, 0])
    assert (
        "| clml |"
        in Path(
            client.download_artifacts(select_run.info.run_id, "selection/2shot.md", str(workdir))
        ).read_text()
    )

    # from the earlier run's backbone: the same episodes and candidates give the same study
    again = run_stages(Config.model_validate(settings), ("select",), from_run=outcome.run_id)
    assert np.array_equal(again.selection.per_k[1].accuracy, study.accuracy)
    assert np.allclose(again.selection.per_k[1].scores["clml"], study.scores["clml"])


@pytest.mark.slow
def test_laplace_logreg_choosing_its_candidates_runs_through_evaluation_and_registration(
    workdir, tiny_pipeline
):
    settings = {
        **tiny_pipeline,
        "meta_train": {"enabled": False},
        "methods": [
            {
                "name": "laplace_logreg",
                "label": "laplace_clml",
                "params": {"features": ["l2", "centred"], "prior_precision": [0.1, 10.0], "orderings": 2},
            }
        ],
        "tracking": {"registered_model": "tiny-laplace"},
    }
    outcome = run_stages(Config.model_validate(settings))
    calibrations = {(r.k_shot, r.calibration) for r in outcome.report.few_shot if r.method == "laplace_clml"}
    assert {(5, "none"), (5, "val_temperature"), (5, "loo_temperature")} <= calibrations
    assert [r.method for r in outcome.report.generalised] == ["laplace_clml", "laplace_clml"]
    assert outcome.registration is not None and outcome.registration.name == "tiny-laplace"
