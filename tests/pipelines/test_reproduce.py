"""``fewshot-med reproduce``: a tiny pipeline run on a local .npz, re-run from what MLflow holds."""

from __future__ import annotations

import copy
import csv
import io
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from fewshot_med.cli import main
from fewshot_med.config import Config
from fewshot_med.data.demo import DEMO_BASE_CLASSES, DEMO_NOVEL_CLASSES, make_demo_dataset
from fewshot_med.pipelines.transfer import run_stages
from fewshot_med.tracking import names


def _write_npz(path: Path, change_one_pixel: bool = False) -> Path:
    dataset = make_demo_dataset(image_size=16)
    arrays = {
        f"{s}_{k}": getattr(dataset.splits[s], k).copy() for s in dataset.splits for k in ("images", "labels")
    }
    if change_one_pixel:
        arrays["test_images"][0, 0, 0, 0] ^= 1
    np.savez(path, **arrays)
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_pipeline, empty_store) -> dict:
    """A trained run (``trained``) and an ``evaluate --from`` run on its backbone (``evaluated``), on a
    local .npz (logged as a path token), one torch thread."""
    folder = tmp_path_factory.mktemp("reproduce")
    store = folder / "store"
    store.mkdir()
    shutil.copy(empty_store, store / "mlflow.db")
    data = _write_npz(folder / "lesions.npz")
    dataset = make_demo_dataset(image_size=16)
    settings = copy.deepcopy(tiny_pipeline)
    settings.update(
        data={
            "source": str(data),
            "class_names": list(dataset.class_names),
            "base_classes": list(DEMO_BASE_CLASSES),
            "novel_classes": list(DEMO_NOVEL_CLASSES),
        },
        meta_train={"enabled": False},
        methods=[{"name": "simpleshot"}],
        runtime={"output_dir": str(folder / "outputs"), "num_threads": 1},
        tracking={"tracking_uri": str(store)},
    )
    config = Config.model_validate(settings)
    threads = torch.get_num_threads()
    try:
        trained = run_stages(config).run_id
        evaluated = run_stages(config, ("evaluate",), from_run=trained).run_id
    finally:
        torch.set_num_threads(threads)
    return {"trained": trained, "evaluated": evaluated, "data": data, "store": store, "folder": folder}


def _cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()  # what the test itself printed (MLflow's download bars)
    monkeypatch.setattr(sys, "argv", ["fewshot-med", *args])
    threads = torch.get_num_threads()
    try:
        with pytest.raises(SystemExit) as done:
            main()
    finally:
        torch.set_num_threads(threads)
    captured = capsys.readouterr()
    return done.value.code or 0, captured.out, captured.err


def _one_line_error(status: int, err: str, *fragments: str) -> None:
    lines = [line for line in err.strip().splitlines() if not line.startswith("warning: ")]
    assert status == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def _reproductions(store: Path, of: str) -> list:
    client = MlflowClient(f"sqlite:///{store}/mlflow.db")
    return client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string=f"tags.{names.REPRODUCES_TAG} = '{of}'",
    )


@pytest.mark.slow
def test_from_backbone_is_exact_and_a_changed_metric_or_commit_is_caught(runs, monkeypatch, capsys):
    store, run_id = str(runs["store"]), runs["evaluated"]
    common = ("--data", str(runs["data"]), "--tracking-uri", store, "--from-backbone")
    status, out, err = _cli(monkeypatch, capsys, "reproduce", run_id, *common)
    assert status == 0, err
    assert out.strip().splitlines()[-1].startswith(f"reproduced run {run_id} (from-backbone, cpu): all ")
    assert "| test.5shot.simpleshot.accuracy |" in out and "differs" not in out
    (new,) = _reproductions(runs["store"], run_id)
    assert new.data.tags[names.STAGES_TAG] == "evaluate"
    assert new.data.tags[names.FROM_RUN_TAG] == runs["trained"]  # the backbone the original evaluated
    client = MlflowClient(f"sqlite:///{store}/mlflow.db")
    table = list(
        csv.DictReader(
            io.StringIO(Path(client.download_artifacts(new.info.run_id, names.REPRODUCE_CSV)).read_text())
        )
    )
    original = client.get_run(run_id).data.metrics
    assert {row["metric"] for row in table} == {key for key in original if not key.startswith("time.")}
    assert all(row["verdict"] == "equal" and float(row["tolerance"]) == 0 for row in table)
    assert {row["metric"]: float(row["original"]) for row in table}["test.5shot.simpleshot.accuracy"] == (
        original["test.5shot.simpleshot.accuracy"]
    )

    # the run claims another commit: refused before any work, unless asked for
    client.set_tag(run_id, names.GIT_COMMIT_TAG, "0" * 40)
    status, _, err = _cli(monkeypatch, capsys, "reproduce", run_id, *common)
    _one_line_error(status, err, "commit 000000000000", "--allow-other-commit")
    assert len(_reproductions(runs["store"], run_id)) == 1

    # a metric that the evaluation does not give back: exit 1, one summary line naming it
    client.log_metric(run_id, "test.5shot.simpleshot.accuracy", 0.123456)
    status, out, err = _cli(monkeypatch, capsys, "reproduce", run_id, *common, "--allow-other-commit")
    assert status == 1, err
    last = out.strip().splitlines()[-1]
    assert last.startswith(f"run {run_id} did not reproduce (from-backbone, cpu): 1 of ")
    assert "test.5shot.simpleshot.accuracy 0.123456 -> " in last
    assert "| test.5shot.simpleshot.accuracy | 0.123456 |" in out and "| differs |" in out
    assert "warning: comparing across commits: run 000000000000" in err


@pytest.mark.slow
def test_full_reproduction_retrains_bitwise_on_the_cpu(runs, monkeypatch, capsys):
    run_id = runs["trained"]
    args = ("reproduce", run_id, "--data", str(runs["data"]), "--tracking-uri", str(runs["store"]))
    status, out, err = _cli(monkeypatch, capsys, *args)
    assert status == 0, out + err
    assert out.strip().splitlines()[-1].startswith(f"reproduced run {run_id} (full, cpu): all ")
    (new,) = _reproductions(runs["store"], run_id)
    assert new.data.tags[names.STAGES_TAG] == "pretrain,meta_train,evaluate"
    client = MlflowClient(f"sqlite:///{runs['store']}/mlflow.db")
    table = Path(client.download_artifacts(new.info.run_id, names.REPRODUCE_MD)).read_text()
    assert "| pretrain.best_val_balanced_accuracy |" in table and "| differs |" not in table


@pytest.mark.slow
def test_from_backbone_of_a_trained_run_is_exact(runs, monkeypatch, capsys):
    args = ("reproduce", runs["trained"], "--data", str(runs["data"]), "--tracking-uri", str(runs["store"]))
    status, out, err = _cli(monkeypatch, capsys, *args, "--from-backbone")
    assert status == 0, out + err


def test_other_data_missing_data_and_unknown_runs_are_refused_in_one_line(runs, monkeypatch, capsys):
    store, run_id = str(runs["store"]), runs["trained"]
    tampered = _write_npz(runs["folder"] / "tampered.npz", change_one_pixel=True)
    before = len(_reproductions(runs["store"], run_id))
    status, out, err = _cli(
        monkeypatch, capsys, "reproduce", run_id, "--data", str(tampered), "--tracking-uri", store
    )
    client = MlflowClient(f"sqlite:///{store}/mlflow.db")
    digest = client.get_run(run_id).data.tags[names.DATA_DIGEST_TAG]
    _one_line_error(status, err, f"--data {tampered} has digest ", f"used {digest[:16]}")
    assert out == "" and len(_reproductions(runs["store"], run_id)) == before

    status, _, err = _cli(monkeypatch, capsys, "reproduce", run_id, "--tracking-uri", store)
    _one_line_error(status, err, "used a local dataset (logged as path-", "pass --data PATH")

    status, _, err = _cli(monkeypatch, capsys, "reproduce", "0123abcd", "--tracking-uri", store)
    _one_line_error(status, err, "no MLflow run '0123abcd'")
