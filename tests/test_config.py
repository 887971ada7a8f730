from pathlib import Path

import pytest

from fewshot_med.config import load_config
from fewshot_med.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    config = load_config(path)
    roles = config.roles()
    assert roles.base and roles.novel and not set(roles.base) & set(roles.novel)


def test_ham10000_config_follows_the_protocol():
    config = load_config(CONFIGS / "ham10000.yaml")
    assert config.data.source == "ham10000"
    assert config.roles().novel == ("akiec", "df", "vasc")
    assert config.episodes.shots == [1, 5, 10]
    assert config.episodes.n_query == 15 and config.episodes.n_test_episodes >= 600


def _write(tmp_path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_overrides_are_parsed_as_yaml(tmp_path):
    config = load_config(
        CONFIGS / "quickstart.yaml",
        ["episodes.shots=[1, 10]", "data.image_size=28", "data.novel_classes=null", "seed=3"],
    )
    assert config.episodes.shots == [1, 10]
    assert config.data.image_size == 28 and config.seed == 3


@pytest.mark.parametrize(
    ("text", "overrides", "message"),
    [
        ("name: x\ndata: {source: demo, imagesize: 3}\n", [], r"c\.yaml: data\.imagesize: unknown key"),
        ("name: x\ndata: {source: demo, image_size: 2}\n", [], r"data\.image_size: Input should be greater"),
        ("name: x\ndata: {source: demo}\nepisodes: {shots: [0]}\n", [], r"episodes\.shots\.0: Input should"),
        ("name: x\n", [], r"c\.yaml: data: Field required"),
        ("name: x\ndata: [1\n", [], r"c\.yaml:\d+: not valid YAML"),
        ("- a\n- b\n", [], "top level must be a mapping"),
        (
            "name: x\ndata: {source: demo}\n",
            ["data.sauce=demo"],
            r"with --set data\.sauce=demo\): data\.sauce",
        ),
        ("name: x\ndata: {source: demo}\n", ["data.source.x=1"], r"'data\.source' is not a section"),
        ("name: x\ndata: {source: demo}\n", ["novalue"], "must look like section.key=value"),
        (
            "name: x\ndata: {source: demo, split_fractions: [0.5, 0.5, 0.5]}\n",
            [],
            r"data: Value error, split_fractions \[0\.5, 0\.5, 0\.5\] must be",
        ),
        (
            "name: x\ndata: {source: demo}\n",
            ["pretrain.swag={enabled: true, start_epoch: 31}", "pretrain.keep=last"],
            r"pretrain: Value error, swag\.start_epoch 31 is after the last epoch \(30\)",
        ),
        (
            "name: x\ndata: {source: demo}\npretrain: {epochs: 1, keep: last, swag: {enabled: true}}\n",
            [],
            r"pretrain: Value error, swag\.start_epoch 1 of 1 epochs with 1 snapshot\(s\) per epoch gives 1",
        ),
        (
            "name: x\ndata: {source: demo}\n",
            ["pretrain.swag.enabled=true"],
            r"pretrain: Value error, swag\.enabled needs the run to reach its last epochs; set early_",
        ),
        (
            "name: x\ndata: {source: demo}\n",
            ["pretrain.swag.rank=1"],
            r"pretrain\.swag\.rank: Input should be",
        ),
    ],
)
def test_bad_configs_name_file_and_key(tmp_path, text, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(_write(tmp_path, text), overrides)


def test_missing_config_and_missing_roles(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "absent.yaml")
    config = load_config(_write(tmp_path, "name: x\ndata: {source: /some/folder}\n"))
    with pytest.raises(ConfigError, match=r"data\.base_classes and data\.novel_classes are required"):
        config.roles()


def test_calibration_choices_are_the_registered_settings():
    import typing

    from fewshot_med.config import EvaluationConfig
    from fewshot_med.evaluation.calibration import CALIBRATION_SETTINGS

    annotation = EvaluationConfig.model_fields["calibration"].annotation
    assert set(typing.get_args(typing.get_args(annotation)[0])) == set(CALIBRATION_SETTINGS)
