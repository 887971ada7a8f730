"""``fewshot-med export --format monai-bundle``: a bundle that ``python -m monai.bundle run`` runs on a
folder of files, with the registered classifier's probabilities; methods that cannot be traced and bad
arguments are refused in one line."""

from __future__ import annotations

import csv
import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from fewshot_med.data.demo_files import write_secondary_capture
from fewshot_med.deploy import FewShotClassifier, Preprocessing, fit_classifier
from fewshot_med.deploy.monai_bundle import PREDICTIONS_FILE, trace_network, write_bundle
from fewshot_med.errors import FewshotMedError
from fewshot_med.methods import METHODS, MethodContext, create_method
from fewshot_med.methods.base import FewShotMethod, class_means
from fewshot_med.tracking.models import load_classifier
from tests.deploy.conftest import SIZE, dicom_bytes, png_bytes
from tests.deploy.test_cli_predict import run_cli

#: Parameters that keep a method's fit short here.
FAST_PARAMS = {"finetune": {"mode": "head", "steps": 2}}
#: Frozen-feature methods whose computation depends on the batch size in ways tracing cannot record.
NOT_TRACEABLE = {"laplace_logreg"}


def fitted(classifier: FewShotClassifier, rare, method: FewShotMethod) -> FewShotClassifier:
    """``method`` fitted like the session classifier (first 3 images per class, same backbone)."""
    rows = np.concatenate([np.flatnonzero(rare.labels == c)[:3] for c in range(len(rare.class_names))])
    return fit_classifier(
        classifier.backbone,
        classifier.spec,
        method,
        rare.images[rows],
        rare.labels[rows],
        rare.class_names,
        temperature=1.5,
        device=torch.device("cpu"),
        preprocessing=classifier.preprocessing,
    )


def random_input(count: int, seed: int) -> tuple[np.ndarray, torch.Tensor]:
    """``(count, 16, 16, 3)`` uint8 images and the same as the network's ``(count, 3, 16, 16)`` floats."""
    images = np.random.default_rng(seed).integers(0, 256, (count, SIZE, SIZE, 3), dtype=np.uint8)
    return images, torch.from_numpy(images).permute(0, 3, 1, 2).float()


@pytest.mark.slow  # the registered classifier (about 15 s, once) and a monai.bundle process (about 20 s)
def test_bundle_run_gives_the_registered_classifiers_probabilities(
    registered, rare, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", str(registered.folder))
    bundle = tmp_path / "bundle"
    code, stdout, _ = run_cli(monkeypatch, capsys, "export", registered.registered_uri, str(bundle))
    assert code == 0 and stdout.strip() == str(bundle)
    for name in ("configs/metadata.json", "configs/inference.json", "models/model.ts", "docs/README.md"):
        assert (bundle / name).is_file(), name

    images = tmp_path / "scans"
    (images / "ward").mkdir(parents=True)
    (images / "a.png").write_bytes(png_bytes(rare.images[0]))  # RGB at the training size
    ramp = np.linspace(0, 4095, 30 * 22).reshape(30, 22)  # 12-bit grey, another size: read as 3 channels
    (images / "b.dcm").write_bytes(dicom_bytes(ramp))
    big = np.kron(rare.images[1], np.ones((3, 3, 1), dtype=np.uint8))  # 48 px RGB secondary capture
    write_secondary_capture(images / "ward" / "c.dcm", big, "SYN-1", "c")
    (images / "d.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (images / "notes.txt").write_text("not an image")
    files = [images / "a.png", images / "b.dcm", images / "d.png", images / "ward" / "c.dcm"]

    out = tmp_path / "out"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "monai.bundle",
            "run",
            "--config_file",
            "configs/inference.json",
            "--dataset_dir",
            str(images),
            "--output_dir",
            str(out),
        ],
        cwd=bundle,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    with (out / PREDICTIONS_FILE).open() as handle:
        rows = list(csv.DictReader(handle))

    expected = load_classifier(registered.registered_uri).predict_table([str(f) for f in files])
    classes = list(rare.class_names)
    assert list(rows[0]) == ["path", *classes, "prediction", "confidence", "abstain", "error"]
    assert [row["path"] for row in rows] == [str(f) for f in files]
    readable = [0, 1, 3]
    got = np.array([[float(rows[i][name]) for name in classes] for i in readable])
    np.testing.assert_allclose(got, expected[classes].to_numpy()[readable], rtol=0, atol=1e-5)
    assert [rows[i]["prediction"] for i in readable] == list(expected["prediction"].iloc[readable])
    assert [rows[i]["abstain"] for i in range(4)] == [str(v) for v in expected["abstain"]]
    assert rows[2]["error"] == expected["error"].iloc[2] and "d.png" in rows[2]["error"]
    assert all(rows[2][name] == "" for name in classes)

    meta = json.loads((bundle / "configs/metadata.json").read_text())
    channels = meta["network_data_format"]["outputs"]["pred"]["channel_def"]
    assert channels == {str(i): name for i, name in enumerate(classes)}
    assert meta["network_data_format"]["inputs"]["image"]["spatial_shape"] == [SIZE, SIZE]
    assert meta["fewshot_med"]["source"] == registered.registered_uri


@pytest.mark.parametrize("name", sorted(METHODS))
def test_each_method_exports_its_probabilities_or_is_refused(name, classifier, rare):
    context = MethodContext(
        backbone=classifier.backbone,
        spec=classifier.spec,
        base_feature_mean=torch.zeros(classifier.backbone.num_features),
    )
    adapted = fitted(classifier, rare, create_method(name, context, **FAST_PARAMS.get(name, {})))
    if METHODS[name].transductive or name in NOT_TRACEABLE:
        with pytest.raises(FewshotMedError, match=f"^method '{name}' ") as refused:
            trace_network(adapted)
        assert "\n" not in str(refused.value)
        return
    network = trace_network(adapted)
    for count, seed in ((1, 10), (5, 11), (16, 12)):
        images, inputs = random_input(count, seed)
        with torch.no_grad():
            probs = network(inputs).numpy()
        np.testing.assert_allclose(probs, adapted.predict_proba(images), rtol=0, atol=1e-5)
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-12)


def test_a_classifier_that_reads_dihedral_views_exports_them(classifier, rare):
    """The exported network averages the backbone's features over the same test-time views as the
    classifier it came from (``BackboneSpec.views``), so its probabilities match on new images."""
    spec = dataclasses.replace(classifier.spec, views="dihedral")
    viewed = fitted(
        dataclasses.replace(classifier, spec=spec), rare, create_method("protonet", MethodContext())
    )
    network = trace_network(viewed)
    images, inputs = random_input(4, 13)
    with torch.no_grad():
        probs = network(inputs).numpy()
    np.testing.assert_allclose(probs, viewed.predict_proba(images), rtol=0, atol=1e-5)
    plain = fitted(classifier, rare, create_method("protonet", MethodContext()))
    assert not np.allclose(plain.predict_proba(images), probs, atol=1e-4)  # the views are not a no-op


class NumpyPrototypes(FewShotMethod):
    """Nearest class mean, scored in numpy: tracing records its output as a constant."""

    name = "numpy_prototypes"
    inputs = "features"

    def _fit(self, support, labels):
        self.prototypes_ = class_means(support, labels, self.n_way_)

    def _predict_logits(self, query):
        difference = query.numpy()[:, :, None, :] - self.prototypes_.numpy()[:, None, :, :]
        return torch.from_numpy(-np.square(difference).sum(axis=-1))


def test_a_method_that_leaves_torch_is_refused_by_name(classifier, rare, tmp_path):
    adapted = fitted(classifier, rare, NumpyPrototypes())
    out = tmp_path / "bundle"
    with pytest.raises(FewshotMedError, match=r"^method 'numpy_prototypes' cannot be exported") as refused:
        write_bundle(adapted, out, "models:/x/1")
    assert "\n" not in str(refused.value)
    assert not out.exists()


@pytest.mark.slow  # saving the TorchScript file imports monai (about 5 s)
def test_bundle_metadata_carries_the_card_and_the_classifier(classifier, tmp_path):
    card = {"intended_use": "tests only", "metrics": {"accuracy": 0.5}}
    out = write_bundle(classifier, tmp_path / "bundle", "models:/tiny/3", card=card)
    meta = json.loads((out / "configs/metadata.json").read_text())
    assert meta["model_card"] == card
    pred = meta["network_data_format"]["outputs"]["pred"]
    assert pred["channel_def"] == {str(i): name for i, name in enumerate(classifier.class_names)}
    assert pred["num_channels"] == len(classifier.class_names)
    image = meta["network_data_format"]["inputs"]["image"]
    assert (image["num_channels"], image["spatial_shape"], image["value_range"]) == (
        3,
        [SIZE, SIZE],
        [0, 255],
    )
    assert meta["fewshot_med"]["temperature"] == classifier.temperature
    assert Preprocessing.from_dict(meta["fewshot_med"]["preprocessing"]) == classifier.preprocessing
    assert meta["required_packages_version"]["fewshot-med"]
    config = json.loads((out / "configs/inference.json").read_text())
    assert config["class_names"] == list(classifier.class_names)
    readme = (out / "docs/README.md").read_text()
    assert "fewshot-med must be installed" in readme and "python -m monai.bundle run" in readme


def test_export_refuses_a_classifier_without_preprocessing(classifier, tmp_path):
    bare = FewShotClassifier(
        classifier.backbone, classifier.spec, classifier.method, 1.0, classifier.class_names
    )
    with pytest.raises(FewshotMedError, match="without preprocessing"):
        write_bundle(bare, tmp_path / "bundle", "models:/x/1")
    assert not (tmp_path / "bundle").exists()


def one_line_error(code: int, stderr: str) -> str:
    """The single ``error: …`` line of an exit-2 failure."""
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


@pytest.fixture
def empty_store(tmp_path, monkeypatch):
    """Run in ``tmp_path`` with an MLflow store folder there that holds nothing."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", str(tmp_path / "store"))


def test_export_with_an_unknown_format_is_one_line(empty_store, tmp_path, monkeypatch, capsys):
    code, _, stderr = run_cli(
        monkeypatch, capsys, "export", "models:/x@champion", str(tmp_path / "b"), "--format", "onnx"
    )
    assert one_line_error(code, stderr) == "error: --format onnx: unknown export format; choose monai-bundle"
    assert not (tmp_path / "b").exists()


def test_export_into_a_non_empty_folder_is_refused_before_loading(empty_store, tmp_path, monkeypatch, capsys):
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    # the store is empty: a refusal about the folder, not the model, shows it was checked first
    code, _, stderr = run_cli(monkeypatch, capsys, "export", "models:/x@champion", str(out))
    assert one_line_error(code, stderr) == (
        f"error: {out} is a non-empty folder; give a new or empty folder for the bundle"
    )
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert not (tmp_path / "store").exists()


@pytest.mark.slow  # uses the session's registered model (about 15 s to build once)
def test_export_with_a_wrong_model_uri_is_one_line(registered, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", str(registered.folder))
    out = tmp_path / "bundle"
    code, _, stderr = run_cli(monkeypatch, capsys, "export", "models:/no-such-model@champion", str(out))
    assert "models:/no-such-model@champion" in one_line_error(code, stderr)
    assert not out.exists()
