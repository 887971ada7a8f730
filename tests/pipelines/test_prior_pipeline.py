"""Fine-tuning under the SWAG prior of pretraining, end to end: the posterior reaches the evaluation
and the registration from the pretrain stage of the same run, and from an earlier run (``--from``)."""

import pytest
from mlflow import MlflowClient

from fewshot_med.config import Config
from fewshot_med.pipelines.transfer import run_stages


@pytest.mark.slow
def test_swag_prior_finetuning_runs_in_the_pipeline_and_from_an_earlier_run(
    workdir, tiny_pipeline, tiny_swag_pretrain
):
    settings = {
        **tiny_pipeline,
        "pretrain": tiny_swag_pretrain,
        "meta_train": {"enabled": False},
        "methods": [
            {
                "name": "finetune",
                "label": "ft_swag",
                "params": {"mode": "last_block", "steps": 2, "prior": "swag", "prior_scale": 100.0},
                "max_episodes": 2,
            }
        ],
        "episodes": {**tiny_pipeline["episodes"], "shots": [1]},
        "evaluation": {"generalised": False, "oracle": False, "plots": False},
        "tracking": {"registered_model": "tiny-swag"},
    }
    config = Config.model_validate(settings)
    outcome = run_stages(config)
    client = MlflowClient(f"sqlite:///{workdir}/mlruns/mlflow.db")
    metrics = client.get_run(outcome.run_id).data.metrics
    assert 0 <= metrics["test.1shot.ft_swag.accuracy"] <= 1
    assert "test.1shot.ft_swag.val_temperature.ece" in metrics
    first = outcome.report.few_shot[0]
    assert (first.method, first.k_shot, first.calibration, len(first)) == ("ft_swag", 1, "none", 2)
    assert outcome.registration is not None and outcome.registration.name == "tiny-swag"

    # without the posterior of the earlier run's pretrain stage, create_method would refuse ft_swag
    evaluated = run_stages(Config.model_validate({**settings, "tracking": {}}), ["evaluate"], outcome.run_id)
    rerun = client.get_run(evaluated.run_id)
    assert rerun.data.tags["from_run"] == outcome.run_id
    assert rerun.data.metrics["test.1shot.ft_swag.accuracy"] == metrics["test.1shot.ft_swag.accuracy"]
