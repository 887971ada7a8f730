"""The ``fewshot-med`` command as a user runs it: output, exit status, one-line errors."""

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", "from fewshot_med.cli import main; main()", *args]
    env = {"COLUMNS": "200", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=env, timeout=300)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_help_lists_only_working_commands():
    result = run("--help")
    assert result.returncode == 0
    for command in ("datasets", "config", "episodes", "select"):
        assert command in result.stdout


@pytest.mark.real_data
def test_datasets_info_on_ham10000(shared_data):
    result = run("datasets", "info", "ham10000")
    assert result.returncode == 0, result.stderr
    rows = {line.split("│")[1].strip(): line for line in result.stdout.splitlines() if line.count("│") > 5}
    cells = lambda name: [c.strip() for c in rows[name].split("│")[1:-1]]  # noqa: E731
    assert cells("akiec") == ["akiec", "novel", "237", "29", "61", "327"]
    assert cells("nv") == ["nv", "base", "4702", "661", "1342", "6705"]
    assert cells("vasc") == ["vasc", "novel", "101", "12", "29", "142"]
    assert "64x64x3" in result.stdout


@pytest.mark.real_data
def test_datasets_info_on_pbc_config(shared_data):
    result = run("datasets", "info", "configs/pbc.yaml")
    assert result.returncode == 0, result.stderr
    basophil = next(line for line in result.stdout.splitlines() if "basophil" in line)
    assert [c.strip() for c in basophil.split("│")[1:-1]] == [
        "basophil",
        "novel",
        "853",
        "122",
        "243",
        "1218",
    ]


@pytest.mark.real_data
def test_episodes_command_writes_the_protocol_list(shared_data, tmp_path):
    out = tmp_path / "ep.json"
    result = run("episodes", "configs/ham10000.yaml", "--shots", "10", "--out", str(out))
    assert result.returncode == 0, result.stderr
    payload = json.loads(out.read_text())
    assert (payload["n_way"], payload["k_shot"], payload["n_query"]) == (3, 10, 15)
    assert len(payload["episodes"]) == 600


def test_config_command_prints_resolved_roles():
    result = run("config", "configs/quickstart.yaml", "--set", "episodes.n_query=5")
    assert result.returncode == 0, result.stderr
    assert "n_query: 5" in result.stdout and "novel_classes:" in result.stdout


def _bad_npz(tmp_path: Path) -> Path:
    path = tmp_path / "bad.npz"
    np.savez(path, train_images=np.zeros((2, 4, 4), np.uint8))
    return path


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (("datasets", "info", "/nonexistent/data.npz"), ["/nonexistent/data.npz", "no such file"]),
        (("datasets", "info", "nonsense"), ["dataset 'nonsense' not found"]),
        (("config", "configs/absent.yaml"), ["configs/absent.yaml", "no such config file"]),
        (("config", "configs/quickstart.yaml", "--set", "data.imagesize=3"), ["data.imagesize: unknown key"]),
        (("episodes", "configs/quickstart.yaml", "-o", "x.json", "--split", "train"), ["--split train"]),
    ],
)
def test_bad_input_gives_one_line(args, fragments):
    assert_one_line_error(run(*args), *fragments)


@pytest.mark.parametrize(
    ("override", "fragments"),
    [
        (
            "methods=[{name: protonett}]",
            ["configs/ham10000.yaml", "methods.0.name: unknown few-shot method 'protonett'; choose from",
             "did you mean 'protonet'?"],
        ),
        (
            "methods=[{name: finetune, params: {steps: -3}}]",
            ["methods.0.params: method 'finetune': steps must be a positive integer, got -3"],
        ),
        (
            "methods=[{name: finetune, params: {stepz: 3}}]",
            ["methods.0.params: method 'finetune' has no parameter stepz", "did you mean 'steps'?"],
        ),
        (
            "model.backbone=resnet10",
            ["model.backbone: 'resnet10' is not a timm model", "did you mean 'resnet10t'?"],
        ),
        (
            "evaluation.calibration=[val_temp]",
            ["evaluation.calibration.0: unknown calibration setting 'val_temp'",
             "choose from loo_temperature, val_temperature; did you mean 'val_temperature'?"],
        ),
    ],
)  # fmt: skip
def test_config_refuses_bad_names(override, fragments):
    assert_one_line_error(run("config", "configs/ham10000.yaml", "--set", override), *fragments)


def test_run_refuses_a_bad_method_before_pretraining(tmp_path):
    store = tmp_path / "mlflow.db"
    result = run(
        "run",
        str(ROOT / "configs/quickstart.yaml"),
        "--set",
        "methods=[{name: protonett}]",
        "--set",
        f"tracking.tracking_uri=sqlite:///{store}",
        cwd=tmp_path,
    )
    assert_one_line_error(result, "methods.0.name: unknown few-shot method 'protonett'", "'protonet'?")
    assert not store.exists() and not list(tmp_path.iterdir())  # no MLflow store, no run, no checkpoint


def test_bad_npz_and_debug_traceback(tmp_path):
    path = _bad_npz(tmp_path)
    assert_one_line_error(run("datasets", "info", str(path)), "bad.npz", "missing key(s)")
    debug = run("--debug", "datasets", "info", str(path))
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "DataError" in debug.stderr


def test_too_many_shots_leaves_no_file(tmp_path):
    out = tmp_path / "ep.json"
    result = run("episodes", "configs/quickstart.yaml", "--shots", "500", "--out", str(out))
    assert_one_line_error(result, "500-shot episodes need at least 501")
    assert not out.exists() and not list(tmp_path.iterdir())


@pytest.mark.slow
def test_sigterm_marks_runs_killed_and_keeps_the_checkpoint(tmp_path, tiny_pipeline):
    import yaml
    from mlflow import MlflowClient

    config = {**tiny_pipeline, "pretrain": {"epochs": 200, "batch_size": 32, "steps_per_epoch": 3}}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(config))
    command = [sys.executable, "-c", "from fewshot_med.cli import main; main()", "run", "tiny.yaml"]
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    checkpoint = tmp_path / "outputs" / "tiny" / "pretrain.pt"
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.2)
    assert checkpoint.exists(), "pretraining wrote no checkpoint"
    process.terminate()
    status, stderr = process.wait(timeout=60), process.stderr.read()
    assert status == 130, stderr
    assert "interrupted (SIGTERM): MLflow runs end KILLED; continue with --resume" in stderr, stderr
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert {run.info.run_name: run.info.status for run in runs} == {"tiny": "KILLED", "pretrain": "KILLED"}


def test_select_from_an_unknown_run_names_it_and_the_store(tmp_path):
    result = run("select", str(ROOT / "configs/quickstart.yaml"), "--from", "0123abcd", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: run 0123abcd is not in the MLflow store") and "mlruns" in last
