"""Commands that write a file or folder refuse a path whose parent folder is missing, in one line and
before any other work, unless ``--parents`` asks for the folders (``check_output_parent``)."""

import signal
import sys
from pathlib import Path

import pytest

from benchmarks import run as benchmarks_run
from fewshot_med._io import check_output_parent
from fewshot_med.cli import main
from fewshot_med.errors import FewshotMedError


@pytest.fixture
def cli(monkeypatch, capsys):
    """Run ``fewshot-med ARGS`` in this process: ``(exit status, stdout, stderr)``."""
    handler = signal.getsignal(signal.SIGTERM)

    def invoke(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["fewshot-med", *args])
        try:
            main()
            status = 0
        except SystemExit as exit_:
            status = exit_.code or 0
        out, err = capsys.readouterr()
        return status, out, err

    yield invoke
    signal.signal(signal.SIGTERM, handler)


def _commands(tmp_path: Path, missing: Path) -> dict[str, list[str]]:
    """Each writing command with inputs that would fail later (a missing config, data, run or model),
    so only a check that comes first reports the missing folder."""
    return {
        "episodes": ["episodes", str(tmp_path / "absent.yaml"), "--out", str(missing / "e.json")],
        "predict": ["predict", "models:/absent@champion", str(tmp_path), "--out", str(missing / "p.csv")],
        "report": ["report", "0123456789abcdef", "--out", str(missing / "r.html")],
        "audit": ["audit", str(tmp_path / "absent"), "--out", str(missing / "audit")],
        "export": ["export", "models:/absent@champion", str(missing / "bundle")],
        "demo-folder": ["datasets", "demo-folder", str(missing / "cases")],
    }


@pytest.mark.parametrize("command", ["episodes", "predict", "report", "audit", "export", "demo-folder"])
def test_a_missing_parent_folder_is_refused_first_in_one_line(cli, tmp_path, command):
    missing = tmp_path / "no" / "such" / "dir"
    status, _, err = cli(*_commands(tmp_path, missing)[command])
    assert status == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert f"parent folder {missing} does not exist: create it first or pass --parents" in lines[0]
    assert not (tmp_path / "no").exists()


def test_parents_creates_the_folders(cli, tmp_path):
    out = tmp_path / "a" / "b" / "cases"
    status, stdout, err = cli(
        "datasets", "demo-folder", str(out), "--per-class", "1", "--image-size", "16", "--parents"
    )
    assert status == 0, err
    assert stdout.strip() == str(out) and len(list(out.iterdir())) == 3  # one folder per demo class


def test_the_benchmark_output_needs_its_folder_unless_parents(tmp_path, capsys):
    missing = tmp_path / "no" / "such"
    assert benchmarks_run.main(["--suite", "bayes", "--output", str(missing / "bench.md")]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (
        f"error: --output {missing / 'bench.md'}: parent folder {missing} does not exist: create it first or "
        "pass --parents"
    )
    assert not (tmp_path / "no").exists()


def test_check_output_parent(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert check_output_parent(Path("predictions.csv"), "--out") == Path("predictions.csv")  # README paths
    assert check_output_parent(Path("bundle/"), "OUT") == Path("bundle")  # a new folder in an existing one
    (tmp_path / "file").write_text("x")
    with pytest.raises(FewshotMedError, match=r"^--out file/x\.csv: file is a file, not a folder"):
        check_output_parent(Path("file/x.csv"), "--out", parents=True)
    assert check_output_parent(tmp_path / "new" / "deep" / "x.csv", "--out", parents=True).parent.is_dir()
