"""A tiny end-to-end pipeline run on demo data, checked through what MLflow actually holds."""

import io
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import PIL.Image
import pytest
import torch
import yaml
from mlflow import MlflowClient

from fewshot_med.config import Config, load_config
from fewshot_med.data import EpisodeList, select_classes
from fewshot_med.data.demo import DEMO_NOVEL_CLASSES, make_demo_dataset
from fewshot_med.errors import ConfigError
from fewshot_med.pipelines.transfer import run_stages


def _children(client: MlflowClient, run) -> dict[str, object]:
    found = client.search_runs(
        [run.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run.info.run_id}'"
    )
    return {child.info.run_name: child for child in found}


@pytest.mark.slow
def test_pipeline_run_tree_metrics_artifacts_and_model(workdir, tiny_pipeline):
    outcome = run_stages(
        Config.model_validate({**tiny_pipeline, "tracking": {"registered_model": "tiny-rare"}})
    )
    assert (workdir / "mlruns" / "mlflow.db").is_file()
    client = MlflowClient(f"sqlite:///{workdir}/mlruns/mlflow.db")
    parent = client.get_run(outcome.run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["data.source"] == "demo" and parent.data.params["seed"] == "0"
    assert len(parent.data.tags["data.digest"]) == 64 and "git_commit" in parent.data.tags

    stages = _children(client, parent)
    assert set(stages) == {"pretrain", "meta_train", "evaluate", "register"}
    history = client.get_metric_history(stages["pretrain"].info.run_id, "pretrain.train_loss")
    assert [m.step for m in history] == [1]
    assert stages["pretrain"].inputs.dataset_inputs[0].dataset.name == "demo.train"

    methods = _children(client, stages["evaluate"])
    assert set(methods) == {"method:simpleshot", "method:ft_head", "method:oracle"}
    simpleshot = methods["method:simpleshot"].data.metrics
    for k in (1, 5):
        for metric in ("accuracy", "balanced_accuracy", "macro_auroc", "ece", "mce", "brier", "nll"):
            assert simpleshot[f"test.{k}shot.{metric}"] >= 0 and f"test.{k}shot.{metric}_ci95" in simpleshot
            assert (
                parent.data.metrics[f"test.{k}shot.simpleshot.{metric}"]
                == simpleshot[f"test.{k}shot.{metric}"]
            )
        assert 0 <= simpleshot[f"generalised.{k}shot.harmonic_mean"] <= 1
    assert "test.1shot.ft_head.accuracy" in parent.data.metrics

    artifacts = {a.path for a in client.list_artifacts(stages["evaluate"].info.run_id)}
    assert {"results.md", "results.csv", "results.json", "episodes"} <= artifacts
    episode_files = {a.path for a in client.list_artifacts(stages["evaluate"].info.run_id, "episodes")}
    assert episode_files == {f"episodes/{split}_{k}shot.json" for split in ("test", "val") for k in (1, 5)}
    saved = EpisodeList.load(
        client.download_artifacts(stages["evaluate"].info.run_id, "episodes/test_5shot.json")
    )
    assert (saved.k_shot, saved.split, len(saved)) == (
        5,
        "test",
        4,
    )  # the artifact is a loadable episode list
    csv = client.download_artifacts(methods["method:simpleshot"].info.run_id, "per_episode/test_5shot.csv")
    assert len(Path(csv).read_text().strip().splitlines()) == 1 + 4  # header + one row per episode

    # calibration: a val-episode temperature for every K, a leave-one-out one from K = 2 on
    for k in (1, 5):
        temperature = simpleshot[f"calibration.{k}shot.val_temperature.temperature"]
        assert 0.05 <= temperature <= 100
        assert simpleshot[f"calibration.{k}shot.val_temperature.nll_after"] <= (
            simpleshot[f"calibration.{k}shot.val_temperature.nll_before"] + 1e-9
        )
        assert f"test.{k}shot.val_temperature.ece" in simpleshot
        # temperature scaling never changes a prediction
        assert simpleshot[f"test.{k}shot.val_temperature.accuracy"] == simpleshot[f"test.{k}shot.accuracy"]
    assert (
        "test.5shot.loo_temperature.ece" in simpleshot and "test.1shot.loo_temperature.ece" not in simpleshot
    )
    assert "test.5shot.simpleshot.val_temperature.ece" in parent.data.metrics
    assert "test.5shot.ft_head.val_temperature.ece" in parent.data.metrics  # image methods: val only
    assert "test.5shot.ft_head.loo_temperature.ece" not in parent.data.metrics

    plots = {a.path for a in client.list_artifacts(methods["method:simpleshot"].info.run_id, "plots")}
    expected = {f"plots/{kind}_{k}shot.png" for kind in ("reliability", "confusion") for k in (1, 5)}
    assert expected | {"plots/generalised_confusion_5shot.png"} <= plots
    parent_plots = {a.path for a in client.list_artifacts(outcome.run_id, "plots")}
    assert parent_plots == {
        "plots/accuracy_vs_shots.png",
        "plots/risk_coverage_1shot.png",
        "plots/risk_coverage_5shot.png",
    }
    table = Path(client.download_artifacts(outcome.run_id, "results.csv")).read_text().splitlines()
    assert table[0].startswith("method,k_shot,calibration,episodes,accuracy,accuracy_ci95")
    assert any(line.startswith("simpleshot,5,loo_temperature,4,") for line in table)

    model = mlflow.pytorch.load_model(f"runs:/{stages['meta_train'].info.run_id}/backbone")
    assert model(torch.zeros(2, 3, 16, 16)).shape == (2, 512)
    rows = outcome.report.few_shot
    assert [(r.method, r.k_shot, r.calibration, len(r)) for r in rows][:8] == [
        ("simpleshot", 1, "none", 4), ("simpleshot", 1, "val_temperature", 4),
        ("simpleshot", 5, "none", 4), ("simpleshot", 5, "val_temperature", 4),
        ("simpleshot", 5, "loo_temperature", 4),
        ("ft_head", 1, "none", 2), ("ft_head", 1, "val_temperature", 2), ("ft_head", 5, "none", 2),
    ]  # fmt: skip

    # the registered classifier: the method with the best val-episode accuracy at K = 5
    registration = outcome.registration
    assert (registration.name, registration.version, registration.holds_alias) == ("tiny-rare", "1", True)
    validation = {
        method: val.summary()["accuracy"][0]
        for (method, k), val in outcome.report.validation.items()
        if k == 5
    }
    best = max(validation, key=validation.get)
    version = client.get_model_version_by_alias("tiny-rare", "champion")
    assert str(version.version) == "1" and float(version.tags["selection_score"]) == validation[best]
    assert f"**{best}**" in version.description and "Selection rule" in version.description
    assert client.get_registered_model("tiny-rare").description == version.description
    classifier = mlflow.pyfunc.load_model("models:/tiny-rare@champion")
    rare = select_classes(make_demo_dataset(image_size=16), "test", DEMO_NOVEL_CLASSES)
    encoded = []
    for image in rare.images[:6]:  # the registered model takes encoded files, as a hospital sends them
        buffer = io.BytesIO()
        PIL.Image.fromarray(image).save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    table = classifier.predict(pd.DataFrame({"image": encoded}))
    assert list(table.columns) == [*rare.class_names, "prediction", "confidence", "abstain", "error"]
    assert not table["error"].any() and not table["abstain"].any()
    assert np.allclose(table[list(rare.class_names)].sum(axis=1), 1.0)

    evaluated = run_stages(
        Config.model_validate(
            {
                **tiny_pipeline,
                "methods": [{"name": "protonet"}],
                "tracking": {"registered_model": "tiny-rare"},
            }
        ),
        ["evaluate"],
        outcome.run_id,
    )
    rerun = client.get_run(evaluated.run_id)
    assert rerun.data.tags["from_run"] == outcome.run_id
    assert "test.5shot.protonet.accuracy" in rerun.data.metrics
    # the alias rule: version 2 becomes champion only if it scores at least as well
    second = evaluated.registration
    score = evaluated.report.validation["protonet", 5].summary()["accuracy"][0]
    assert second.version == "2" and second.holds_alias == (score >= validation[best])
    holder = str(client.get_model_version_by_alias("tiny-rare", "champion").version)
    assert holder == ("2" if second.holds_alias else "1")


def test_bad_method_is_refused_before_pretraining(workdir, tiny_pipeline):
    path = workdir / "tiny.yaml"
    path.write_text(yaml.safe_dump({**tiny_pipeline, "methods": [{"name": "nope"}]}))
    with pytest.raises(ConfigError, match=r"tiny\.yaml: methods\.0\.name: unknown few-shot method 'nope'"):
        run_stages(load_config(path))
    assert [child.name for child in workdir.iterdir()] == ["tiny.yaml"]  # no MLflow store, no checkpoint
