"""The logged classifier through MLflow: signature, metadata, card, and the same answers as the
classifier itself for paths, bytes and base64 text."""

from __future__ import annotations

import base64
import io
import json

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.models import Model
from PIL import Image

from fewshot_med.tracking import names
from fewshot_med.tracking._store import using_store
from fewshot_med.tracking.models import load_classifier, load_model_card
from tests.deploy.conftest import MODEL_NAME, SIZE, png_bytes

pytestmark = pytest.mark.slow  # the session's store and logged model take about 15 s


def assert_same_table(got: pd.DataFrame, expected: pd.DataFrame, classes: list[str]) -> None:
    assert list(got.columns) == list(expected.columns)
    np.testing.assert_allclose(got[classes].to_numpy(float), expected[classes].to_numpy(float), atol=1e-12)
    assert list(got["prediction"]) == list(expected["prediction"])
    assert list(got["abstain"]) == list(expected["abstain"])
    assert list(got["error"] != "") == list(expected["error"] != "")


def test_the_pyfunc_reads_paths_bytes_and_base64_like_the_classifier(registered, classifier, rare, tmp_path):
    paths = []
    for index in range(3):
        paths.append(tmp_path / f"{index}.png")
        paths[-1].write_bytes(png_bytes(rare.images[index]))
    paths.append(tmp_path / "broken.png")
    paths[-1].write_bytes(b"broken")
    expected = classifier.predict_table(paths)
    classes = list(classifier.class_names)
    with using_store(registered.store):
        model = mlflow.pyfunc.load_model(registered.registered_uri)
    contents = [path.read_bytes() for path in paths]
    inputs = {
        "paths": pd.DataFrame({"path": [str(path) for path in paths]}),
        "bytes": pd.DataFrame({"image": contents}),
        "base64": pd.DataFrame({"image": [base64.b64encode(data).decode() for data in contents]}),
    }
    for kind, table in inputs.items():
        got = model.predict(table)
        assert_same_table(got, expected, classes), kind
    assert "broken.png" in model.predict(inputs["paths"])["error"].iloc[3]
    # arrays of images (any size) go through the python model itself: the signature takes columns
    arrays = model.unwrap_python_model().predict(None, rare.images[:3])
    assert_same_table(arrays, expected.iloc[:3], classes)


def test_the_logged_model_keeps_signature_preprocessing_card_and_a_png_example(
    registered, classifier, tmp_path
):
    with using_store(registered.store):
        local = mlflow.artifacts.download_artifacts(registered.model_uri, dst_path=str(tmp_path))
    model = Model.load(local)
    inputs = model.signature.inputs.to_dict()
    assert [(c["name"], c["type"], c["required"]) for c in inputs] == [
        ("path", "string", False),
        ("image", "binary", False),
    ]
    outputs = [c["name"] for c in model.signature.outputs.to_dict()]
    assert outputs == [*classifier.class_names, "prediction", "confidence", "abstain", "error"]
    assert model.metadata[names.PREPROCESSING_METADATA_KEY] == classifier.preprocessing.to_dict()
    assert model.metadata[names.ABSTAIN_METADATA_KEY] is None
    assert model.metadata[names.SPEC_METADATA_KEY] == json.loads(json.dumps(classifier.spec.to_dict()))
    assert model.metadata[names.CARD_METADATA_KEY] == registered.card
    assert json.loads((tmp_path / names.MODEL_CARD_JSON).read_text()) == registered.card
    card = (tmp_path / names.MODEL_CARD).read_text()
    assert card.startswith("# Model card") and "## intended_use\n\ntests only" in card
    example = model.load_input_example(local)
    assert list(example.columns) == ["image"]  # an encoded PNG, never a path
    image = np.asarray(Image.open(io.BytesIO(example["image"].iloc[0])))
    assert image.shape == (SIZE, SIZE, 3)


def test_load_classifier_takes_model_uris_and_run_ids(registered, classifier, rare, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", str(registered.folder))
    expected = classifier.predict_proba(rare.images[:2])
    for uri in (registered.registered_uri, f"models:/{MODEL_NAME}/1", registered.run_id):
        loaded = load_classifier(uri)
        np.testing.assert_allclose(loaded.predict_proba(rare.images[:2]), expected, atol=1e-12)
        assert loaded.preprocessing == classifier.preprocessing
        assert load_model_card(uri) == registered.card
