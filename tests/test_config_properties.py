"""Property-based tests of ``--set`` overrides: ``load_config(path, overrides)`` returns a config whose key
holds the value YAML parses the override to, or raises a one-line ``ConfigError`` that names the key;
never another exception, and never a YAML boolean read as a number."""

from functools import reduce
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from fewshot_med.config import Config, load_config
from fewshot_med.errors import ConfigError

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"

#: keys that take numbers only, at every depth: plain, optional, in a list or tuple, nested sections,
#: and a section that is not a StrictModel (data.intensity)
NUMERIC_KEYS = (
    "seed",
    "pretrain.epochs",
    "pretrain.lr",
    "pretrain.weight_decay",
    "pretrain.swag.rank",
    "episodes.n_way",
    "episodes.shots",
    "episodes.query_dirichlet_alpha",
    "data.image_size",
    "data.split_fractions",
    "data.intensity.center",
    "data.intensity.percentiles",
    "evaluation.temperature_bounds",
    "evaluation.coverage",
    "selection.prior_precision",
)
OTHER_KEYS = (
    "name",
    "tracking.experiment",
    "pretrain.augment",
    "pretrain.optimizer",
    "evaluation.calibration",
)

#: strings pydantic's lax mode reads as numbers or booleans ('inf', 'no', 'yes', 't', …) need one of
#: f, n, t, y or a digit; these letters make none of them
WORDS = st.text(alphabet="abcdeghijklmopqrsuvwxz -:[{#'\"", min_size=1, max_size=8)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(10**9), 10**9)
    | st.floats(allow_nan=False, width=32)
    | WORDS
    | st.sampled_from(["sgd", "adamw", "val_temperature", "x"])
)
VALUES = SCALARS | st.lists(SCALARS, max_size=4)


def as_yaml(value: object) -> str:
    """``value`` written as YAML flow text that reads back as ``value`` (floats keep their dot)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**9)
    return text.removesuffix("\n...\n").rstrip("\n")


def key_value(config: Config, key: str) -> object:
    value = reduce(getattr, key.split("."), config)
    return list(value) if isinstance(value, tuple) else value


def has_boolean(value: object) -> bool:
    return isinstance(value, bool) or (isinstance(value, list) and any(map(has_boolean, value)))


def assert_names_the_key(error: ConfigError, key: str) -> None:
    message = str(error)
    assert len(message.splitlines()) == 1 and key in message, message


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(NUMERIC_KEYS + OTHER_KEYS), VALUES)
def test_an_override_sets_the_parsed_value_or_names_the_key(key, value):
    text = as_yaml(value)
    assert yaml.safe_load(text) == value
    try:
        config = load_config(CONFIG, [f"{key}={text}"])
    except ConfigError as error:
        assert_names_the_key(error, key)
        return
    assert not (key in NUMERIC_KEYS and has_boolean(value)), f"{key}={text} was read as a number"
    assert key_value(config, key) == value


@settings(max_examples=150, deadline=None)
@given(
    st.sampled_from(NUMERIC_KEYS + OTHER_KEYS + ("model.backbone", "model.weights", "methods", "data"))
    | st.text(alphabet="abcdefghijklmnopqrstuvwxyz_.0123456789 -", min_size=1, max_size=20),
    st.text(max_size=30),
)
def test_any_override_text_gives_a_config_or_one_line_naming_the_key(key, raw):
    try:
        load_config(CONFIG, [f"{key}={raw}"])
    except ConfigError as error:
        assert_names_the_key(error, key.strip())


@pytest.mark.parametrize(
    ("override", "fragments"),
    [
        ("pretrain.epochs=true", ["pretrain.epochs: expected an integer, got true"]),
        ("episodes.n_way=false", ["episodes.n_way: expected an integer or null, got false"]),
        ("episodes.shots=[1, true]", ["episodes.shots: expected an integer at [1], got true"]),
        ("data.intensity.center=yes", ["data.intensity: expected a number or null at center, got true"]),
        ("name=[oops", ['--set name: value "[oops" is not valid YAML', "name expects a string"]),
        ("pretrain.swag={rank: 3", ["--set pretrain.swag: value", "expects a section"]),
        ("episodes.shots=oops", ['episodes.shots: Input should be a valid list (got "oops")']),
        ("episodes.seed=-1", ["episodes.seed: Input should be greater than or equal to 0 (got -1)"]),
    ],
)
def test_refusals_name_the_key_the_value_and_the_type(override, fragments):
    with pytest.raises(ConfigError) as error:
        load_config(CONFIG, [override])
    for fragment in fragments:
        assert fragment in str(error.value)


def test_config_files_refuse_booleans_for_numbers_too(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: x\ndata: {source: demo}\npretrain: {epochs: true, lr: 1e-3}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"c\.yaml: pretrain\.epochs: expected an integer, got true"):
        load_config(path)
    path.write_text("name: x\ndata: {source: demo}\npretrain: {epochs: 2, lr: 1e-3}\n", encoding="utf-8")
    config = load_config(path)  # PyYAML reads 1e-3 as a string; it is still the number 0.001
    assert config.pretrain.epochs == 2 and config.pretrain.lr == 0.001
