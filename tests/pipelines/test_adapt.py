"""``fewshot-med adapt`` through the command line: bad input refused in one line before any work, and end
to end on a small generated folder and on a manifest with planted patient data, checked through what
the MLflow store holds (model, card, metrics, out-of-fold predictions, no file names or patient ids)."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image

from fewshot_med import tracking
from fewshot_med.cli import main
from fewshot_med.config import Config, DataConfig, TrackingConfig
from fewshot_med.data import MedicalImageDataset, Split
from fewshot_med.data.demo import DEMO_NOVEL_CLASSES, make_demo_dataset
from fewshot_med.errors import DataError
from fewshot_med.models import BackboneSpec, create_backbone
from fewshot_med.pipelines.adapt import LocalData, check_local_data
from fewshot_med.tracking import names
from tests.phi import PLANTED, find_planted, plant_dataset

#: stands for a hospital folder name and file names that must never reach the store
FOLDER, FILE_STEM = "ward7_Dr_Okafor", "case_MRN4471"
PER_CLASS = 8
#: the classes in logit order: the class folders' (natural) order
CLASSES = sorted(DEMO_NOVEL_CLASSES)


def _cli(
    args: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> tuple[int, str, str]:
    """Run ``fewshot-med <args>`` in this process: exit status, stdout, stderr."""
    monkeypatch.setattr(sys, "argv", ["fewshot-med", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    captured = capsys.readouterr()
    return exit_info.value.code or 0, captured.out, captured.err


def _one_line_error(code: int, err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--choose-by", "auroc"], "unknown choice rule 'auroc'"),
        (["--methods", "simpleshot,tim"], "'tim' is transductive"),
        (["--methods", "finetune"], "'finetune' fine-tunes on images"),
        (["--methods", "logreg,protonett"], "did you mean 'protonet'"),
        (["--target-coverage", "0.8", "--target-accuracy", "0.9"], "give one of --target-coverage"),
        (["--target-coverage", "1.5"], "must be in (0, 1]"),
        (["--folds", "1"], "need folds ≥ 2"),
        (["--intensity", "mode=window"], "--intensity: mode window needs center and width"),
    ],
)
def test_bad_options_are_refused_in_one_line_before_any_work(tmp_path, monkeypatch, capsys, options, message):
    (tmp_path / "data" / "a").mkdir(parents=True)
    code, out, err = _cli(
        ["adapt", str(tmp_path / "data"), "--from", "0123abc", *options], monkeypatch, capsys
    )
    assert message in _one_line_error(code, err) and out == ""
    assert not (tmp_path / "mlruns").exists()


def test_a_missing_folder_is_refused_before_any_store_is_opened(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, _, err = _cli(["adapt", "no_such_folder", "--from", "0123abc"], monkeypatch, capsys)
    assert "no_such_folder: no such folder or manifest" in _one_line_error(code, err)
    assert not (tmp_path / "mlruns").exists()


def _local(counts: list[int]) -> LocalData:
    labels = np.repeat(np.arange(len(counts)), counts)
    images = np.zeros((len(labels), 8, 8, 3), dtype=np.uint8)
    empty = Split(images[:0], labels[:0])
    dataset = MedicalImageDataset(
        "local",
        tuple("abc"[: len(counts)]),
        {"train": Split(images, labels), "val": empty, "test": empty},
        "x",
    )
    return LocalData(images, labels, None, dataset)


def test_one_class_or_a_class_of_one_image_is_refused():
    with pytest.raises(DataError, match="the data holds one class \\('a'\\); a classifier needs at least 2"):
        check_local_data(_local([5]))
    with pytest.raises(DataError, match="class 'b' has 1 image; cross-validation needs at least 2"):
        check_local_data(_local([3, 1, 4]))
    check_local_data(_local([2, 2]))


# --------------------------------------------------------------------------- end to end (a store)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """A store holding a pipeline run whose pretrain stage logged a (randomly initialised) 32 px backbone:
    what ``fewshot-med pretrain`` leaves, without the training."""
    folder = tmp_path_factory.mktemp("adapt") / "store"
    settings = TrackingConfig(tracking_uri=str(folder))
    spec = BackboneSpec("resnet10t", 3, 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    torch.manual_seed(0)
    config = Config(name="adapt-test", data=DataConfig(source="demo"), tracking=settings)
    with tracking.pipeline_run(config) as run, tracking.stage_run(names.PRETRAIN):
        tracking.log_backbone(create_backbone(spec.name, spec.in_chans, spec.image_size), spec)
    (folder / "run_id").write_text(run.run_id)
    return folder


@pytest.fixture(scope="module")
def demo_folder(tmp_path_factory) -> Path:
    """``FOLDER/<class>/FILE_STEM<i>.png``: 8 demo images of each rare class at 32 px."""
    dataset = make_demo_dataset(seed=0, image_size=32, images_per_common_class=40, images_per_rare_class=40)
    root = tmp_path_factory.mktemp("hospital") / FOLDER
    train = dataset.splits["train"]
    for name in CLASSES:
        rows = np.flatnonzero(train.labels == dataset.class_names.index(name))[:PER_CLASS]
        (root / name).mkdir(parents=True)
        for index, row in enumerate(rows):
            Image.fromarray(train.images[row]).save(root / name / f"{FILE_STEM}{index}.png")
    return root


def _adapt_run(client: MlflowClient, name: str, version: str):
    return client.get_run(client.get_model_version(name, version).run_id)


def _artifacts(client: MlflowClient, run_id: str, folder: str | None = None) -> list[str]:
    found = []
    for item in client.list_artifacts(run_id, folder):
        found += _artifacts(client, run_id, item.path) if item.is_dir else [item.path]
    return found


def _download(client: MlflowClient, run_id: str, path: str, tmp_path: Path) -> Path:
    return Path(client.download_artifacts(run_id, path, str(tmp_path)))


@pytest.mark.slow
def test_adapt_registers_a_calibrated_abstaining_classifier_and_keeps_names_out(
    store, demo_folder, tmp_path, monkeypatch, capsys
):
    args = ["adapt", str(demo_folder), "--from", (store / "run_id").read_text(), "--tracking-uri", str(store)]
    code, out, err = _cli([*args, "--name", "demo-clinic"], monkeypatch, capsys)
    assert code == 0, err
    assert out.splitlines()[-1] == "models:/demo-clinic@champion"

    client = MlflowClient(f"sqlite:///{store}/mlflow.db")
    run = _adapt_run(client, "demo-clinic", "1")
    tags, metrics, params = run.data.tags, run.data.metrics, run.data.params
    assert tags[names.STAGE_TAG] == names.ADAPT and tags[names.FROM_RUN_TAG] == (store / "run_id").read_text()
    assert tags[names.holds_alias_tag("champion")] == "true" and params["adapt.scheme"] == "stratified"
    assert (params["adapt.folds"], params["adapt.repeats"], params["adapt.choose_by"]) == (
        "5",
        "3",
        "logloss",
    )

    # the card, the candidates and the out-of-fold predictions, as the store holds them
    card = json.loads(_download(client, run.info.run_id, names.MODEL_CARD_JSON, tmp_path).read_text())
    assert card["data"]["classes"] == dict.fromkeys(CLASSES, PER_CLASS)
    assert "Not a medical device" in " ".join(card["limitations"])
    for metric, estimate in card["cross_validation"]["uncalibrated"].items():
        assert estimate["low"] <= estimate["value"] <= estimate["high"], metric
        assert metrics[names.adapt_metric(metric)] == pytest.approx(estimate["value"])
    with _download(client, run.info.run_id, names.ADAPT_CANDIDATES, tmp_path).open() as handle:
        candidates = list(csv.DictReader(handle))
    assert len(candidates) == 1 + 4 + 9 and sum(row["chosen"] == "True" for row in candidates) == 1
    chosen = next(row for row in candidates if row["chosen"] == "True")
    assert float(chosen["log_loss"]) == min(
        float(row["log_loss"]) for row in candidates
    )  # --choose-by logloss
    oof = pd.read_csv(_download(client, run.info.run_id, names.ADAPT_PREDICTIONS, tmp_path))
    assert len(oof) == 3 * 3 * PER_CLASS and set(oof.groupby("repeat").image.nunique()) == {3 * PER_CLASS}
    probs = oof[CLASSES].to_numpy()
    hits = np.asarray(CLASSES)[probs.argmax(axis=1)] == oof.label.to_numpy()
    assert metrics[names.adapt_metric("accuracy")] == pytest.approx(hits.mean())  # hand-computed CV accuracy
    threshold = card["model"]["abstain_below"]
    kept = oof.confidence >= threshold
    assert 0.9 <= kept.mean() < 0.9 + 2 / len(oof)  # the requested coverage, on the out-of-fold predictions
    assert kept.mean() == pytest.approx(metrics[names.adapt_value("oof_coverage")])
    assert (oof.abstain == ~kept).all()
    assert client.get_model_version("demo-clinic", "1").description.startswith("# demo-clinic")

    # the served model reads files, calibrated as the card says, abstaining below its threshold
    files = sorted(str(path) for path in demo_folder.rglob("*.png"))
    table = mlflow.pyfunc.load_model("models:/demo-clinic@champion").predict(pd.DataFrame({"path": files}))
    assert list(table.columns[:3]) == CLASSES and (table.error == "").all()
    assert np.allclose(table[CLASSES].sum(axis=1), 1)
    assert (table.abstain == (table.confidence < threshold)).all()

    # every name the run holds is in the naming contract; no folder or file name reached the store
    vocabulary = names.Vocabulary((), (), (), (), ())
    assert all(names.is_defined("metric", key, names.ADAPT, vocabulary) for key in metrics)
    assert all(names.is_defined("param", key, names.ADAPT, vocabulary) for key in params)
    own_tags = [key for key in tags if not key.startswith("mlflow.")]
    assert all(names.is_defined("tag", key, names.ADAPT, vocabulary) for key in own_tags)
    files_logged = _artifacts(client, run.info.run_id)
    assert all(names.is_defined("artifact", path, names.ADAPT, vocabulary) for path in files_logged)
    assert find_planted(store, [FOLDER, FILE_STEM, str(demo_folder.parent)]) == []


@pytest.mark.slow
def test_adapt_from_a_registered_model_groups_patients_and_keeps_phi_out(
    store, demo_folder, tmp_path, monkeypatch, capsys
):
    if not MlflowClient(f"sqlite:///{store}/mlflow.db").search_registered_models("name = 'demo-clinic'"):
        args = ["adapt", str(demo_folder), "--from", (store / "run_id").read_text(), "--name", "demo-clinic"]
        assert _cli([*args, "--tracking-uri", str(store)], monkeypatch, capsys)[0] == 0
    manifest, patient_ids = plant_dataset(tmp_path)
    args = ["adapt", str(manifest), "--from", "models:/demo-clinic@champion", "--tracking-uri", str(store)]
    args += ["--name", "planted", "--choose-by", "clml", "--folds", "3", "--repeats", "1"]
    code, out, err = _cli([*args, "--target-accuracy", "0.999"], monkeypatch, capsys)
    assert code == 0, err
    assert out.splitlines()[-1] == "models:/planted@champion"

    client = MlflowClient(f"sqlite:///{store}/mlflow.db")
    run = _adapt_run(client, "planted", "1")
    assert run.data.tags[names.FROM_MODEL_TAG] == "models:/demo-clinic@champion"
    card = json.loads(_download(client, run.info.run_id, names.MODEL_CARD_JSON, tmp_path).read_text())
    assert card["selection"]["scheme"] == "stratified_group" and card["data"]["patients"] == len(patient_ids)
    assert card["model"]["method"] == "laplace_logreg"
    assert card["model"]["params"]["chosen_features"] in ("raw", "l2", "centred")
    assert "models:/demo-clinic@champion" in card["model"]["base_feature_mean"]  # carried by the model
    abstention = card["abstention"]
    assert abstention["target"] == "accuracy"
    if abstention["reached"]:
        assert abstention["selective_accuracy"] >= 0.999
    else:
        assert card["model"]["abstain_below"] is None and "does not abstain" in " ".join(card["limitations"])
        assert "no out-of-fold coverage reaches" in err
    assert find_planted(store, (*PLANTED, *patient_ids)) == []


@pytest.mark.slow
def test_bad_data_and_sources_are_refused_in_one_line(store, tmp_path, monkeypatch, capsys):
    run_id = (store / "run_id").read_text()
    image = np.full((32, 32, 3), 128, dtype=np.uint8)
    layouts = {
        "one_class": {"a": 3},
        "singleton": {"a": 3, "b": 1},
        "unreadable": {"a": 3, "b": 3},
    }
    for layout, counts in layouts.items():
        for name, count in counts.items():
            (tmp_path / layout / name).mkdir(parents=True)
            for index in range(count):
                Image.fromarray(image + index).save(tmp_path / layout / name / f"{index}.png")
    (tmp_path / "unreadable" / "b" / "broken.png").write_bytes(b"not a png")
    expected = {
        "one_class": "the data holds one class ('a')",
        "singleton": "class 'b' has 1 image; cross-validation needs at least 2",
        "unreadable": "broken.png: cannot read",
    }
    common = ["--tracking-uri", str(store), "--name", "never-registered"]
    for layout, message in expected.items():
        code, out, err = _cli(
            ["adapt", str(tmp_path / layout), "--from", run_id, *common], monkeypatch, capsys
        )
        assert message in _one_line_error(code, err) and out == "", layout
    for source, message in (
        ("models:/no-such-model@champion", "cannot load model models:/no-such-model@champion"),
        ("0123456789abcdef0123456789abcdef", "is not in the MLflow store"),
    ):
        code, _, err = _cli(
            ["adapt", str(tmp_path / "unreadable"), "--from", source, *common], monkeypatch, capsys
        )
        assert message in _one_line_error(code, err), source
    assert not MlflowClient(f"sqlite:///{store}/mlflow.db").search_registered_models(
        "name = 'never-registered'"
    )
