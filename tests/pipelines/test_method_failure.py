"""A method that raises during the evaluation is contained: its run FAILED with the reason, the other
methods' runs FINISHED with their metrics, the report and the parent runs name the failure."""

import warnings
from pathlib import Path

import pytest
from mlflow import MlflowClient
from torch import Tensor

from fewshot_med.config import Config
from fewshot_med.methods import METHODS
from fewshot_med.methods.simpleshot import SimpleShot
from fewshot_med.pipelines.transfer import run_stages
from fewshot_med.tracking import names

REASON = "Pivots given to lu_solve must all be greater or equal to 1"


class _Breaks(SimpleShot):
    """SimpleShot whose fit raises like a solver that broke down."""

    name = "breaks"

    def _fit(self, support: Tensor, labels: Tensor) -> None:
        raise RuntimeError(f"{REASON}\nsecond line of the message")


def _children(client: MlflowClient, run_id: str) -> dict[str, object]:
    run = client.get_run(run_id)
    found = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'")
    return {child.info.run_name: child for child in found}


@pytest.mark.slow
def test_a_failing_method_is_reported_and_the_others_are_evaluated(workdir, tiny_pipeline, monkeypatch):
    monkeypatch.setitem(METHODS, "breaks", _Breaks)
    settings = {
        **tiny_pipeline,
        "meta_train": {"enabled": False},
        "methods": [{"name": "simpleshot"}, {"name": "breaks"}, {"name": "r2d2"}],
        "episodes": {"shots": [5], "n_test_episodes": 3, "n_query": 3},
        "evaluation": {"generalised": False, "plots": False},
    }
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outcome = run_stages(Config.model_validate(settings), ("pretrain", "evaluate"))
    expected = f"RuntimeError: {REASON}"
    assert [str(w.message) for w in caught if "breaks" in str(w.message)] == [
        f"method 'breaks' failed and is left out of the results: {expected}"
    ]
    assert outcome.report.failed == {"breaks": expected}
    assert "| breaks | " + expected + " |" in outcome.report.table()

    client = MlflowClient(f"sqlite:///{workdir}/mlruns/mlflow.db")
    parent = client.get_run(outcome.run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags[names.FAILED_METHODS_TAG] == "breaks"
    evaluate = _children(client, outcome.run_id)["evaluate"]
    assert evaluate.info.status == "FINISHED"
    assert evaluate.data.tags[names.FAILED_METHODS_TAG] == "breaks"
    results_md = client.download_artifacts(evaluate.info.run_id, names.RESULTS_MD, str(workdir))
    assert expected in Path(results_md).read_text(encoding="utf-8")

    methods = _children(client, evaluate.info.run_id)
    failed = methods[names.method_stage("breaks")]
    assert failed.info.status == "FAILED"
    assert failed.data.tags[names.ERROR_TAG].startswith(expected)
    assert failed.data.tags[names.METHOD_TAG] == "breaks" and not failed.data.metrics
    for label in ("simpleshot", "r2d2"):
        run = methods[names.method_stage(label)]
        assert run.info.status == "FINISHED"
        assert 0 <= run.data.metrics["test.5shot.accuracy"] <= 1
        assert f"test.5shot.{label}.accuracy" in parent.data.metrics
    assert not any(".breaks." in key for key in parent.data.metrics)
    # the tags the failure wrote are contract names of their runs
    config = Config.model_validate(settings)
    vocabulary = names.Vocabulary(
        shots=(5,),
        methods=("simpleshot", "breaks", "r2d2", names.ORACLE),
        calibrations=tuple(config.evaluation.calibration),
        metrics=(),
        generalised_metrics=(),
        criteria=(),
        alias=config.tracking.model_alias,
        config_paths=frozenset(),
    )
    assert names.is_defined("tag", names.FAILED_METHODS_TAG, None, vocabulary)
    assert names.is_defined("tag", names.FAILED_METHODS_TAG, names.EVALUATE, vocabulary)
    assert names.is_defined("tag", names.ERROR_TAG, names.method_stage("breaks"), vocabulary)
