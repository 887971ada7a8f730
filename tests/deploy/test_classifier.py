"""``FewShotClassifier.predict_table``: the probabilities of ``predict_proba``, abstention, error rows."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from fewshot_med.deploy import Preprocessing
from fewshot_med.errors import DataError
from tests.deploy.conftest import SIZE, make_classifier, png_bytes

COLUMNS = ["prediction", "confidence", "abstain", "error"]


def test_predict_table_holds_the_probabilities_of_predict_proba(classifier, rare):
    images = rare.images[9:21]
    table = classifier.predict_table(images)
    probs = classifier.predict_proba(images)
    names = list(rare.class_names)
    assert list(table.columns) == [*names, *COLUMNS]
    np.testing.assert_allclose(table[names].to_numpy(), probs, rtol=0, atol=1e-12)
    assert list(table["prediction"]) == [names[i] for i in probs.argmax(axis=1)]
    np.testing.assert_allclose(table["confidence"], probs.max(axis=1), rtol=0, atol=1e-12)
    assert not table["abstain"].any() and (table["error"] == "").all()


def test_files_and_arrays_of_the_same_images_get_the_same_answer(classifier, rare, tmp_path):
    paths = []
    for index in range(3):
        paths.append(tmp_path / f"{index}.png")
        paths[-1].write_bytes(png_bytes(rare.images[index]))
    from_files = classifier.predict_table(paths)
    from_bytes = classifier.predict_table([path.read_bytes() for path in paths])
    from_arrays = classifier.predict_table(rare.images[:3])
    names = list(rare.class_names)
    np.testing.assert_allclose(from_files[names], from_arrays[names], rtol=0, atol=1e-12)
    np.testing.assert_allclose(from_bytes[names], from_arrays[names], rtol=0, atol=1e-12)


def test_an_unreadable_item_gets_an_error_row_and_the_others_their_answer(classifier, rare, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n but then nothing")
    table = classifier.predict_table([rare.images[0], broken, rare.images[1]])
    names = list(rare.class_names)
    probs = classifier.predict_proba(rare.images[:2])
    np.testing.assert_allclose(table.loc[[0, 2], names].to_numpy(), probs, rtol=0, atol=1e-12)
    bad = table.loc[1]
    assert bad[names].isna().all() and np.isnan(bad["confidence"])
    assert bad["prediction"] == "" and bool(bad["abstain"]) and "broken.png" in bad["error"]
    assert (table.loc[[0, 2], "error"] == "").all() and not table.loc[[0, 2], "abstain"].any()


def test_abstains_exactly_below_the_threshold(classifier, rare):
    confidence = classifier.predict_proba(rare.images).max(axis=1)
    threshold = float(np.median(confidence))
    table = dataclasses.replace(classifier, abstain_below=threshold).predict_table(rare.images)
    np.testing.assert_array_equal(table["abstain"].to_numpy(), confidence < threshold)
    assert 0 < table["abstain"].sum() < len(table)
    assert (table["prediction"] != "").all()  # an abstention still says what it would have predicted


def test_fit_classifier_keeps_the_threshold_and_checks_it(rare):
    fitted = make_classifier(rare, Preprocessing(SIZE, 3), abstain_below=0.6)
    assert fitted.abstain_below == 0.6 and fitted.preprocessing == Preprocessing(SIZE, 3)
    with pytest.raises(ValueError, match="abstain_below"):
        make_classifier(rare, None, abstain_below=1.5)
    with pytest.raises(ValueError, match="1 channel"):
        make_classifier(rare, Preprocessing(SIZE, 1))  # fitted on RGB images


def test_without_preprocessing_it_takes_training_size_uint8_arrays_only(rare):
    bare = make_classifier(rare, None)
    table = bare.predict_table(rare.images[:4])
    np.testing.assert_allclose(
        table[list(rare.class_names)].to_numpy(), bare.predict_proba(rare.images[:4]), rtol=0, atol=1e-12
    )
    with pytest.raises(DataError, match="without preprocessing"):
        bare.predict_table(["scan.png"])
