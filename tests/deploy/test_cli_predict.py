"""``fewshot-med predict``: a CSV row per file, a summary line, and one-line errors."""

from __future__ import annotations

import csv
import signal
import sys

import numpy as np
import pytest

from fewshot_med import cli
from tests.deploy.conftest import png_bytes

pytestmark = pytest.mark.slow  # uses the session's registered model (about 15 s to build once)


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """Run ``fewshot-med`` in this process; its exit status, stdout and stderr."""
    monkeypatch.setattr(sys, "argv", ["fewshot-med", *args])
    previous = signal.getsignal(signal.SIGTERM)
    try:
        cli.main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code or 0
    finally:
        signal.signal(signal.SIGTERM, previous)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_predict_on_a_folder_with_a_corrupt_file(registered, classifier, rare, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", str(registered.folder))
    folder = tmp_path / "scans"
    (folder / "sub").mkdir(parents=True)
    files = [folder / "a.png", folder / "c.png", folder / "sub" / "b.png"]
    for index, path in enumerate(files):
        path.write_bytes(png_bytes(rare.images[index]))
    (folder / "b_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (folder / "readme.txt").write_text("not an image")
    out = tmp_path / "predictions.csv"
    code, stdout, _ = run_cli(
        monkeypatch,
        capsys,
        "predict",
        registered.registered_uri,
        str(folder),
        "--out",
        str(out),
        "--batch-size",
        "2",
    )
    assert code == 0
    assert stdout.strip().splitlines()[-1] == f"4 images, 0 abstained, 1 failed -> {out}"
    with out.open() as handle:
        rows = list(csv.DictReader(handle))
    classes = list(classifier.class_names)
    assert list(rows[0]) == ["path", *classes, "prediction", "confidence", "abstain", "error"]
    shown = [
        str(folder / "a.png"),
        str(folder / "b_corrupt.png"),
        str(folder / "c.png"),
        str(folder / "sub" / "b.png"),
    ]
    assert [row["path"] for row in rows] == shown
    corrupt = rows[1]
    assert corrupt["error"] and "b_corrupt.png" in corrupt["error"] and corrupt["prediction"] == ""
    assert corrupt["abstain"] == "True" and all(corrupt[name] == "" for name in classes)
    read = [rows[0], rows[2], rows[3]]
    probs = classifier.predict_proba(rare.images[[0, 1, 2]])
    np.testing.assert_allclose([[float(row[name]) for name in classes] for row in read], probs, atol=1e-9)
    assert [row["prediction"] for row in read] == [classes[i] for i in probs.argmax(axis=1)]


def test_predict_with_a_wrong_model_uri_is_one_line(registered, rare, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", str(registered.folder))
    image = tmp_path / "a.png"
    image.write_bytes(png_bytes(rare.images[0]))
    code, _, stderr = run_cli(monkeypatch, capsys, "predict", "models:/no-such-model@champion", str(image))
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ")
    assert "models:/no-such-model@champion" in lines[0] and "Traceback" not in stderr
    assert not (tmp_path / "predictions.csv").exists()


def test_predict_fails_when_no_file_can_be_read(registered, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", str(registered.folder))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.png").write_bytes(b"junk")
    code, stdout, stderr = run_cli(monkeypatch, capsys, "predict", registered.run_id, "bad.png")
    assert code == 2
    assert stdout.strip().splitlines()[-1] == "1 images, 0 abstained, 1 failed -> predictions.csv"
    progress, error = stderr.strip().splitlines()  # the progress line, then the one-line error
    assert progress.startswith("predict: image 1/1")
    assert error == "error: none of the 1 images could be read; the reasons are in predictions.csv"
    with (tmp_path / "predictions.csv").open() as handle:
        assert [row["path"] for row in csv.DictReader(handle)] == ["bad.png"]
