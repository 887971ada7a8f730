"""MLflow tracking, checked by reading back what the store holds with ``MlflowClient``."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from functools import partial
from importlib import metadata
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from mlflow import MlflowClient
from mlflow.utils.file_utils import local_file_uri_to_path

from fewshot_med import tracking
from fewshot_med.config import Config
from fewshot_med.data.demo import make_demo_dataset
from fewshot_med.errors import FewshotMedError
from fewshot_med.models import BackboneSpec, create_backbone
from fewshot_med.privacy import redact_path

BACKBONE_SPEC = BackboneSpec("resnet10t", in_chans=3, image_size=16, mean=(0.5,) * 3, std=(0.25,) * 3)


def tiny_config(**tracking_settings: object) -> Config:
    return Config.model_validate({"name": "t", "data": {"source": "demo"}, "tracking": tracking_settings})


@pytest.fixture(scope="module")
def dataset():
    return make_demo_dataset(image_size=16, images_per_common_class=40, images_per_rare_class=40)


def children(client: MlflowClient, parent_id: str) -> dict[str, str]:
    """``{stage tag: run id}`` of the runs nested directly in ``parent_id``."""
    parent = client.get_run(parent_id)
    runs = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'"
    )
    return {run.data.tags["stage"]: run.info.run_id for run in runs}


def test_pipeline_run_holds_tree_params_tags_metrics_inputs_and_artifacts(store, dataset):
    config = tiny_config()
    source_file = Path("images.npz").resolve()
    source_file.write_bytes(b"")
    file_dataset = dataclasses.replace(dataset, source=str(source_file))
    with tracking.pipeline_run(config, run_name="demo-run") as pipeline:
        with tracking.stage_run("pretrain", params={"lr": 0.01, "schedule": "cosine"}) as pretrain:
            tracking.log_dataset_input(dataset, "training", "train", classes=dataset.class_names[:5])
            for step in range(4):
                tracking.log_metrics({"pretrain.loss": 1.0 / (step + 1), "pretrain.lr": 0.01}, step)
        with tracking.stage_run("evaluate") as evaluate:
            tracking.log_dataset_input(file_dataset, "evaluation", "test")
            with tracking.stage_run("simpleshot", tags={"method": "simpleshot"}) as method:
                summary = {"accuracy": (0.75, 0.05), "macro_auroc": (float("nan"), float("nan"))}
                key = partial(tracking.names.test_metric, 5, None, tracking.names.UNCALIBRATED)
                tracking.log_metrics(tracking.summary_metrics(summary, key))
                tracking.log_dict_artifact(
                    {"accuracy": torch.tensor([0.5, 1.0]), "nll": [float("nan")]}, "episodes/test_5shot.json"
                )
            tracking.log_metrics({"test.5shot.simpleshot.accuracy": 0.75}, run_id=pipeline.run_id)

    parent = store.get_run(pipeline.run_id)
    assert parent.info.status == "FINISHED"
    assert parent.info.run_name == "demo-run"
    assert store.get_experiment(parent.info.experiment_id).name == "t"
    assert children(store, pipeline.run_id) == {"pretrain": pretrain.run_id, "evaluate": evaluate.run_id}
    assert children(store, evaluate.run_id) == {"simpleshot": method.run_id}
    for run_id in (pretrain.run_id, evaluate.run_id, method.run_id):
        assert store.get_run(run_id).info.status == "FINISHED"
    assert store.get_run(method.run_id).data.tags["method"] == "simpleshot"

    params = parent.data.params
    assert params["name"] == "t"
    assert params["data.source"] == "demo"
    assert params["episodes.shots"] == "[1, 5, 10]"
    assert params["model.backbone"] == "resnet10t"
    assert json.loads(params["methods"])[0]["name"] == "simpleshot"
    assert store.get_run(pretrain.run_id).data.params == {"lr": "0.01", "schedule": "cosine"}

    tags = parent.data.tags
    assert tags["git_commit"] == "unknown" or re.fullmatch(r"[0-9a-f]{40}", tags["git_commit"])
    assert tags["version.torch"] == metadata.version("torch")
    assert tags["version.mlflow"] == mlflow.__version__
    assert {"version.fewshot_med", "version.timm", "version.monai"} <= tags.keys()
    assert (tags["seed"], tags["backbone"], tags["data.source"]) == ("0", "resnet10t", "demo")
    assert tags["data.digest"] == dataset.digest
    assert store.get_run(pretrain.run_id).data.tags["data.digest"] == dataset.digest

    history = store.get_metric_history(pretrain.run_id, "pretrain.loss")
    assert [(m.step, m.value) for m in history] == [(s, 1.0 / (s + 1)) for s in range(4)]
    method_metrics = store.get_run(method.run_id).data.metrics
    assert method_metrics["test.5shot.accuracy"] == 0.75
    assert method_metrics["test.5shot.accuracy_ci95"] == 0.05
    assert str(method_metrics["test.5shot.macro_auroc"]) == "nan"
    assert parent.data.metrics["test.5shot.simpleshot.accuracy"] == 0.75

    (data_input,) = store.get_run(pretrain.run_id).inputs.dataset_inputs
    assert data_input.dataset.name == "demo.train"
    assert dataset.digest.startswith(data_input.dataset.digest)
    assert len(data_input.dataset.digest) == tracking.runs.DIGEST_CHARS
    assert dataset.source in data_input.dataset.source
    input_tags = {tag.key: tag.value for tag in data_input.tags}
    assert input_tags["mlflow.data.context"] == "training"
    assert json.loads(input_tags["classes"]) == list(dataset.class_names[:5])
    (file_input,) = store.get_run(evaluate.run_id).inputs.dataset_inputs
    assert (file_input.dataset.name, file_input.dataset.source_type) == ("demo.test", "local")
    assert json.loads(file_input.dataset.source) == {"uri": redact_path(file_dataset.source)}  # privacy.md

    assert [a.path for a in store.list_artifacts(pipeline.run_id)] == ["config.yaml"]
    logged_config = yaml.safe_load(mlflow.artifacts.load_text(f"{parent.info.artifact_uri}/config.yaml"))
    assert Config.model_validate(logged_config) == config
    method_artifacts = store.get_run(method.run_id).info.artifact_uri
    episodes = mlflow.artifacts.load_dict(f"{method_artifacts}/episodes/test_5shot.json")
    assert episodes == {"accuracy": [0.5, 1.0], "nll": [None]}

    assert tracking.find_stage_run(pipeline.run_id, "pretrain") == pretrain.run_id
    assert tracking.find_stage_run(pipeline.run_id, "meta_train") is None


@pytest.mark.slow
def test_logged_backbone_reloads_with_same_outputs(store, cwd, monkeypatch):
    torch.manual_seed(0)
    backbone = create_backbone("resnet10t", image_size=16)
    with tracking.pipeline_run(tiny_config()), tracking.stage_run("pretrain") as stage:
        model_uri = tracking.log_backbone(backbone, BACKBONE_SPEC)
    assert backbone.training  # the caller's module is untouched

    images = torch.randn(5, 3, 16, 16)
    backbone.eval()
    with torch.no_grad():
        expected = backbone(images)
        assert torch.allclose(mlflow.pytorch.load_model(model_uri)(images), expected, atol=1e-6)
        reloaded, spec = tracking.load_backbone(stage.run_id)
        assert spec == BACKBONE_SPEC
        assert torch.allclose(reloaded.eval()(images), expected, atol=1e-6)

    info = mlflow.models.get_model_info(model_uri)
    assert info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"] == (-1, 3, 16, 16)
    assert info.signature.outputs.to_dict()[0]["tensor-spec"]["shape"] == (-1, backbone.num_features)
    assert info.saved_input_example_info is not None
    model_dir = Path(mlflow.artifacts.download_artifacts(model_uri))
    requirements = (model_dir / "requirements.txt").read_text()
    assert f"torch=={metadata.version('torch').split('+')[0]}" in requirements
    (logged,) = store.search_logged_models([store.get_run(stage.run_id).info.experiment_id])
    assert logged.source_run_id == stage.run_id

    # a fresh process that never opened a run: MLflow's global URI is unset
    monkeypatch.setattr("mlflow.tracking._tracking_service.utils._tracking_uri", None)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    with torch.no_grad():
        reloaded, _ = tracking.load_backbone(stage.run_id)
        assert torch.allclose(reloaded.eval()(images), expected, atol=1e-6)
    assert not (cwd / "mlflow.db").exists()  # nothing read from (or created in) MLflow's default store
    assert "MLFLOW_TRACKING_URI" not in os.environ


@pytest.mark.parametrize(
    ("error", "status"), [(RuntimeError("diverged"), "FAILED"), (KeyboardInterrupt(), "KILLED")]
)
def test_failing_stage_ends_its_run_and_the_parent_with_what_was_logged(store, error, status):
    with pytest.raises(type(error)), tracking.pipeline_run(tiny_config()) as pipeline:
        with tracking.stage_run("pretrain"):
            pass
        with tracking.stage_run("meta_train") as failing:
            tracking.log_metrics({"meta_train.loss": 2.0}, step=0)
            tracking.log_metrics({"meta_train.loss": 1.5}, step=1)
            raise error

    failed = store.get_run(failing.run_id)
    assert failed.info.status == status
    assert [m.value for m in store.get_metric_history(failing.run_id, "meta_train.loss")] == [2.0, 1.5]
    assert store.get_run(pipeline.run_id).info.status == status
    assert store.get_run(children(store, pipeline.run_id)["pretrain"]).info.status == "FINISHED"
    if status == "FAILED":
        assert failed.data.tags["error"] == "RuntimeError: diverged"
    assert mlflow.active_run() is None


def test_a_caught_stage_failure_leaves_the_pipeline_finished(store):
    with tracking.pipeline_run(tiny_config()) as pipeline:
        with pytest.raises(ValueError), tracking.stage_run("bad_method"):
            raise ValueError("unknown param")
        tracking.log_metrics({"done": 1.0})
    assert store.get_run(pipeline.run_id).info.status == "FINISHED"
    assert store.get_run(pipeline.run_id).data.metrics == {"done": 1.0}
    assert store.get_run(children(store, pipeline.run_id)["bad_method"]).info.status == "FAILED"


@pytest.mark.slow
def test_fresh_store_lives_under_mlruns_and_nothing_else_is_written(cwd, dataset):
    with tracking.pipeline_run(tiny_config()) as pipeline, tracking.stage_run("evaluate"):
        tracking.log_dataset_input(dataset, "evaluation", "test")
        tracking.log_metrics({"test.1shot.accuracy": 0.5})
        tracking.log_dict_artifact({"episodes": [1, 2]}, "episodes/test_1shot.json")

    assert sorted(path.name for path in cwd.iterdir()) == ["mlruns"]
    assert sorted(path.name for path in (cwd / "mlruns").iterdir()) == ["artifacts", "mlflow.db"]
    client = MlflowClient(f"sqlite:///{cwd / 'mlruns' / 'mlflow.db'}")
    artifact_dir = Path(local_file_uri_to_path(client.get_run(pipeline.run_id).info.artifact_uri))
    assert artifact_dir.is_relative_to(cwd / "mlruns" / "artifacts" / "t")
    assert (artifact_dir / "config.yaml").is_file()
    assert len(list((cwd / "mlruns" / "artifacts").rglob("test_1shot.json"))) == 1


def test_experiments_open_on_their_runs_in_the_mlflow_ui(store):
    kind = tracking.names.EXPERIMENT_KIND_TAG
    store.create_experiment("older")
    store.create_experiment("genai", tags={kind: "genai_development"})
    for name in ("new", "older", "genai"):
        with tracking.pipeline_run(tiny_config(experiment=name)):
            pass
    kinds = {name: store.get_experiment_by_name(name).tags.get(kind) for name in ("new", "older", "genai")}
    model_development = tracking.names.EXPERIMENT_KIND
    assert kinds == {"new": model_development, "older": model_development, "genai": "genai_development"}


def test_mlflow_tracking_uri_environment_is_honoured(cwd, empty_store, monkeypatch):
    database = cwd / "elsewhere" / "store.db"
    database.parent.mkdir()
    shutil.copy(empty_store, database)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{database}")
    with tracking.pipeline_run(tiny_config(experiment="env-experiment")) as pipeline:
        tracking.log_metrics({"x": 1.0})

    client = MlflowClient(f"sqlite:///{database}")
    run = client.get_run(pipeline.run_id)
    assert client.get_experiment(run.info.experiment_id).name == "env-experiment"
    assert run.data.metrics == {"x": 1.0}
    assert not (cwd / "mlruns").exists()
    artifact_dir = Path(local_file_uri_to_path(run.info.artifact_uri))
    assert artifact_dir.is_relative_to(cwd / "elsewhere" / "artifacts")


def test_tracking_uri_precedence_and_normalisation(cwd, monkeypatch):
    assert tracking.tracking_uri() == f"sqlite:///{cwd / 'mlruns' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert tracking.tracking_uri() == "http://tracking.example:5000"
    settings = tiny_config(tracking_uri="runs/store").tracking
    assert tracking.tracking_uri(settings) == f"sqlite:///{cwd / 'runs' / 'store' / 'mlflow.db'}"
    relative_db = tiny_config(tracking_uri="sqlite:///db/x.db?timeout=20").tracking
    assert tracking.tracking_uri(relative_db) == f"sqlite:///{cwd / 'db' / 'x.db'}?timeout=20"


def test_disabled_tracking_writes_nothing(cwd, dataset):
    backbone = create_backbone("resnet10t", image_size=16)
    for config, enabled in ((tiny_config(), False), (tiny_config(enabled=False), True)):
        with tracking.pipeline_run(config, enabled=enabled) as pipeline:
            assert pipeline.run_id is None
            with tracking.stage_run("pretrain") as stage:
                assert stage.run_id is None
                tracking.log_metrics({"loss": 1.0}, step=0)
                tracking.log_dataset_input(dataset, "training", "train")
                tracking.log_dict_artifact({"a": 1}, "a.json")
                tracking.set_tags({"a": "b"})
                assert tracking.log_backbone(backbone, BACKBONE_SPEC) is None
    tracking.log_metrics({"outside": 1.0})
    assert list(cwd.iterdir()) == []
    assert mlflow.active_run() is None


def test_ui_command_serves_the_local_store(cwd):
    argv, env = tracking.ui_command(port=5123)
    assert argv[1:4] == ["-m", "mlflow", "ui"]
    assert argv[argv.index("--backend-store-uri") + 1] == f"sqlite:///{cwd / 'mlruns' / 'mlflow.db'}"
    assert argv[argv.index("--default-artifact-root") + 1] == (cwd / "mlruns" / "artifacts").as_uri()
    assert argv[argv.index("--port") + 1] == "5123"
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    with pytest.raises(FewshotMedError, match="already a server"):
        tracking.ui_command(settings=tiny_config(tracking_uri="http://host:5000").tracking)


def test_flatten_params_dots_keys_and_truncates_long_values():
    flat = tracking.flatten_params({"a": {"b": 1, "c": None, "d": {}}, "e": "x" * 7000, "f": [1, (2, 3)]})
    assert flat["a.b"] == "1" and flat["a.c"] == "null" and flat["a.d"] == "{}"
    assert flat["f"] == "[1, [2, 3]]"
    assert len(flat["e"]) == 6000 and flat["e"].endswith("[truncated]")
