"""What ``fewshot-med predict`` classifies: files, folders, globs and manifests, in the user's words."""

from __future__ import annotations

from pathlib import Path

import pytest

from fewshot_med.deploy.batch import expand_inputs
from fewshot_med.errors import DataError


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def test_folders_globs_manifests_and_files_are_expanded_in_order(tmp_path):
    scans = tmp_path / "scans"
    touch(scans / "b.png"), touch(scans / "sub" / "a.dcm"), touch(scans / "notes.txt")
    touch(tmp_path / "x1.jpg"), touch(tmp_path / "x2.jpg")
    manifest = tmp_path / "lists" / "manifest.csv"
    manifest.parent.mkdir()
    manifest.write_text("path,label\n../scans/b.png,nv\nnew/c.png,mel\n")
    specs = [str(scans), str(tmp_path / "x*.jpg"), str(manifest), str(tmp_path / "missing.png")]
    files = expand_inputs(specs)
    assert files == [
        (str(scans / "b.png"), scans / "b.png"),
        (str(scans / "sub" / "a.dcm"), scans / "sub" / "a.dcm"),  # recursive; notes.txt is no image
        (str(tmp_path / "x1.jpg"), tmp_path / "x1.jpg"),
        (str(tmp_path / "x2.jpg"), tmp_path / "x2.jpg"),
        ("../scans/b.png", manifest.parent / "../scans/b.png"),  # shown as the manifest writes it
        ("new/c.png", manifest.parent / "new/c.png"),
        (str(tmp_path / "missing.png"), tmp_path / "missing.png"),  # kept: it gets an error row
    ]


def test_a_manifest_without_a_path_column_or_nothing_to_classify_is_refused(tmp_path):
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("file,label\na.png,nv\n")
    with pytest.raises(DataError, match="'path' column"):
        expand_inputs([str(manifest)])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no image files"):
        expand_inputs([str(tmp_path / "empty"), str(tmp_path / "*.png")])
