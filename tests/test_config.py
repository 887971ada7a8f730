from pathlib import Path

import pytest

from fewshot_med.config import Config, load_config, search_combinations
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


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "methods=[{name: protonett}]",
            "methods.0.name: unknown few-shot method 'protonett'; choose from anil, bd_cspn, finetune, "
            "laplace_logreg, logreg, protonet, pt_map, r2d2, simpleshot, tim; did you mean 'protonet'?",
        ),
        (
            "methods=[{name: finetune, params: {steps: -3}}]",
            "methods.0.params: method 'finetune': steps must be a positive integer, got -3",
        ),
        (
            "methods=[{name: finetune, params: {mode: heads}}]",
            "methods.0.params: method 'finetune': mode must be one of head, last_block, full, got 'heads'; "
            "did you mean 'head'?",
        ),
        (
            "methods=[{name: tim, search: {alpah: [1, 2]}}]",
            "methods.0.search: search: method 'tim' has no parameter alpah; its parameters: features, "
            "temperature, steps, lr, ce_weight, marginal_weight, conditional_weight, alpha; did you mean "
            "'alpha'?",
        ),
        (
            "methods=[{name: logreg, params: {C: 1}, search: {C: [0.1, 1]}}]",
            "methods.0.search: 'C' is both in params and in search; keep it in one",
        ),
        (
            "methods=[{name: pt_map, search: {features: [power, cosine]}}]",
            "methods.0.search: search: method 'pt_map': features must be one of raw, l2, centred, power, "
            "got 'cosine'",
        ),
        (
            "methods=[{name: finetune, search: {steps: [5, 10]}}]",
            "methods.0.search: method 'finetune' fine-tunes on images: a search would rerun it",
        ),
        (
            "methods=[{name: r2d2, params: {lamda: 1}}]",
            "methods.0.params: method 'r2d2' has no parameter lamda; its parameters: features, lam, scale; "
            "did you mean 'lam'?",
        ),
        (
            "model.backbone=resnet10",
            "model.backbone: 'resnet10' is not a timm model (timm.list_models('resnet*') lists them); "
            "did you mean 'resnet10t'?",
        ),
        (
            "model={backbone: resnet50t, pretrained: true}",
            "model.pretrained: timm publishes no pretrained weights for 'resnet50t'",
        ),
        ("model.weights=/nonexistent/w.pt", "model.weights: '/nonexistent/w.pt' is not a file"),
        (
            "evaluation.calibration=[val_temperatur]",
            "evaluation.calibration.0: unknown calibration setting 'val_temperatur'; choose from "
            "loo_temperature, val_temperature; did you mean 'val_temperature'?",
        ),
        (
            "selection.features=[raw, centered]",
            "selection.features.1: unknown feature transform 'centered'; choose from centred, l2, power, "
            "raw; did you mean 'centred'?",
        ),
        ("selection.criteria=[cmll]", "selection.criteria.0: unknown selection criterion 'cmll'"),
        (
            "meta_train.algorithm=fomam",
            "meta_train.algorithm: unknown meta-training algorithm 'fomam'; choose from anil, fomaml, "
            "protonet; did you mean 'fomaml'?",
        ),
    ],
)
def test_registry_names_and_method_params_are_checked(override, message):
    with pytest.raises(ConfigError) as error:
        load_config(CONFIGS / "quickstart.yaml", [override])
    assert str(error.value).startswith(f"{CONFIGS / 'quickstart.yaml'} (with --set {override}): ")
    assert message in str(error.value) and "\n" not in str(error.value)


def test_every_bad_name_is_reported_at_once():
    with pytest.raises(ConfigError) as error:
        load_config(CONFIGS / "quickstart.yaml", ["methods=[{name: protonett}]", "model.backbone=resnet10"])
    message = str(error.value)
    assert "methods.0.name: unknown few-shot method 'protonett'" in message and "\n" not in message
    assert "model.backbone: 'resnet10' is not a timm model" in message


@pytest.mark.parametrize(
    "method",
    [
        # the SWAG posterior and the base-class mean come from the run, not the config
        {"name": "finetune", "params": {"mode": "full", "prior": "swag", "steps": 20}},
        {"name": "laplace_logreg", "params": {"features": ["l2", "centred"], "prior_precision": [0.1, 1]}},
        {"name": "simpleshot", "params": {"temperature": 0.5}},
    ],
)
def test_context_parameters_are_not_needed_to_validate(method):
    config = load_config(CONFIGS / "quickstart.yaml", [f"methods=[{method}]"])
    assert config.methods[0].params == method["params"]


def test_defaults_are_registered():
    from fewshot_med.evaluation.calibration import CALIBRATION_SETTINGS
    from fewshot_med.methods import METHODS
    from fewshot_med.models.backbone import timm_names
    from fewshot_med.selection.candidates import FEATURE_TRANSFORMS
    from fewshot_med.selection.criteria import CRITERIA
    from fewshot_med.training.meta import ALGORITHMS

    defaults = Config.model_validate({"name": "x", "data": {"source": "demo"}})
    assert {m.name for m in defaults.methods} <= set(METHODS)
    assert defaults.model.backbone in timm_names().models
    assert set(defaults.evaluation.calibration) <= set(CALIBRATION_SETTINGS)
    assert set(defaults.selection.features) <= set(FEATURE_TRANSFORMS)
    assert set(defaults.selection.criteria) <= set(CRITERIA)
    assert defaults.meta_train.algorithm in ALGORITHMS


def test_the_registry_is_the_source_of_the_choices(monkeypatch):
    from fewshot_med.evaluation import calibration

    settings = calibration.CALIBRATION_SETTINGS
    monkeypatch.setitem(settings, "isotonic", settings["val_temperature"])
    config = load_config(CONFIGS / "quickstart.yaml", ["evaluation.calibration=[isotonic]"])
    assert config.evaluation.calibration == ["isotonic"]
    monkeypatch.delitem(settings, "isotonic")
    with pytest.raises(ConfigError, match="unknown calibration setting 'isotonic'"):
        load_config(CONFIGS / "quickstart.yaml", ["evaluation.calibration=[isotonic]"])


def test_weights_file_is_checked_where_it_is(tmp_path):
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"")
    config = load_config(CONFIGS / "quickstart.yaml", [f"model.weights={weights}"])
    assert config.model.weights == str(weights)


def test_a_search_needs_the_val_episodes():
    overrides = ["methods=[{name: bd_cspn, search: {features: [l2, power]}}]", "evaluation.calibration=[]"]
    with pytest.raises(ConfigError, match="methods bd_cspn search hyperparameters on the val episodes"):
        load_config(CONFIGS / "quickstart.yaml", overrides)
    config = load_config(CONFIGS / "quickstart.yaml", overrides[:1])
    assert search_combinations(config.methods[0].search) == [{"features": "l2"}, {"features": "power"}]
    assert search_combinations({"a": [1, 2], "b": ["x", "y"]}) == [
        {"a": 1, "b": "x"},
        {"a": 1, "b": "y"},
        {"a": 2, "b": "x"},
        {"a": 2, "b": "y"},
    ]
