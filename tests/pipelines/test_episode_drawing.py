"""One function draws episodes: the evaluate stage, the ``episodes`` command and the benchmark suites see
the identical lists; and the stage context every stage takes."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from mlflow import MlflowClient
from pydantic import ValidationError

from fewshot_med.config import Config
from fewshot_med.errors import FewshotMedError
from fewshot_med.pipelines.episodes import draw_episodes, validation_shots
from fewshot_med.pipelines.stages import StageContext, load_data
from fewshot_med.pipelines.transfer import backbone_stages, run_stages


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fewshot_med", *args], capture_output=True, text=True, check=False
    )


@pytest.mark.slow
def test_the_episodes_command_writes_the_lists_the_evaluation_saved(workdir, tiny_pipeline):
    settings = {**tiny_pipeline, "meta_train": {"enabled": False}, "methods": [{"name": "simpleshot"}]}
    outcome = run_stages(Config.model_validate(settings))
    client = MlflowClient(f"sqlite:///{workdir}/mlruns/mlflow.db")
    (evaluate,) = client.search_runs(
        [client.get_run(outcome.run_id).info.experiment_id],
        f"tags.mlflow.parentRunId = '{outcome.run_id}' and tags.stage = 'evaluate'",
    )
    config_file = workdir / "tiny.yaml"
    config_file.write_text(yaml.safe_dump(settings), encoding="utf-8")
    for split in ("test", "val"):
        saved = Path(client.download_artifacts(evaluate.info.run_id, f"episodes/{split}_5shot.json", workdir))
        written = workdir / f"{split}.json"
        result = _cli("episodes", str(config_file), "--shots", "5", "--split", split, "--out", str(written))
        assert result.returncode == 0, result.stderr
        assert json.loads(written.read_text()) == json.loads(saved.read_text())


def test_the_episodes_command_refuses_a_missing_folder(tmp_path):
    config_file = tmp_path / "demo.yaml"
    config_file.write_text(yaml.safe_dump({"name": "demo", "data": {"source": "demo"}}), encoding="utf-8")
    result = _cli("episodes", str(config_file), "--out", str(tmp_path / "no" / "such" / "e.json"))
    assert result.returncode == 2
    assert f"folder {tmp_path / 'no' / 'such'} does not exist" in result.stderr
    assert not (tmp_path / "no").exists()


@pytest.fixture(scope="module")
def demo_context() -> StageContext:
    config = Config.model_validate({"name": "demo", "data": {"source": "demo", "image_size": 16}})
    return StageContext(config, load_data(config), torch.device("cpu"))


def test_val_episodes_stand_in_for_each_k_with_the_shots_the_split_allows(demo_context):
    pools = {split: demo_context.data.subset(split, "novel") for split in ("val", "test")}
    episodes = draw_episodes(demo_context.config, pools, demo_context.n_way, shots=[1, 5, 10])
    assert sorted(episodes.test) == sorted(episodes.val) == [1, 5, 10]
    for k, listed in episodes.val.items():
        assert listed.k_shot == validation_shots(pools["val"], k) <= k
        assert listed.split == "val" and episodes.test[k].split == "test" and episodes.test[k].k_shot == k
    assert draw_episodes(demo_context.config, pools, demo_context.n_way, val=False).val is None
    again = draw_episodes(demo_context.config, pools, demo_context.n_way, shots=[5], val=False)
    assert again.test[5] == episodes.test[5]


def test_stages_that_need_a_backbone_say_so(demo_context):
    assert demo_context.n_way == len(demo_context.data.roles.novel)
    with pytest.raises(FewshotMedError, match="needs a backbone"):
        demo_context.trained()
    with pytest.raises(FewshotMedError, match="--from"):
        backbone_stages(demo_context, ("evaluate",))


def test_imbalanced_test_queries_from_the_config_or_an_override_and_balanced_val(demo_context):
    pools = {split: demo_context.data.subset(split, "novel") for split in ("val", "test")}
    n_way, config = demo_context.n_way, demo_context.config
    settings = {"name": "demo", "data": {"source": "demo", "image_size": 16}}
    skewed_config = Config.model_validate({**settings, "episodes": {"query_dirichlet_alpha": 0.5}})
    for alpha in (0, "inf"):
        with pytest.raises(ValidationError, match="query_dirichlet_alpha"):
            Config.model_validate({**settings, "episodes": {"query_dirichlet_alpha": alpha}})
    balanced = draw_episodes(config, pools, n_way, shots=[5], val=True)
    drawn = draw_episodes(skewed_config, pools, n_way, shots=[5], val=True)
    test, val = drawn.test[5], drawn.val[5]
    assert test.query_dirichlet_alpha == 0.5 and val.query_dirichlet_alpha is None
    assert val == balanced.val[5]  # val episodes calibrate and choose: always balanced
    assert test.arrays.query_rows.shape == balanced.test[5].arrays.query_rows.shape
    assert len({tuple(len(rows) for rows in e.query) for e in test.episodes}) > 1
    # a benchmark draws imbalanced lists from a balanced config, or balanced ones from an imbalanced config
    override = draw_episodes(config, pools, n_way, shots=[5], val=False, query_dirichlet_alpha=0.5)
    assert override.test[5] == test
    override = draw_episodes(skewed_config, pools, n_way, shots=[5], val=False, query_dirichlet_alpha=None)
    assert override.test[5] == balanced.test[5]
