"""The timm backbone factory: any timm model by name, adapted to small medical images.

A backbone maps ``(N, C, H, W)`` images to ``(N, D)`` pooled features (timm's ``num_classes=0``
view); ``D`` is ``backbone.num_features``. Heads are separate ``nn.Linear`` layers.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import json
import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch import nn

from fewshot_med.errors import FewshotMedError, did_you_mean
from fewshot_med.models.weights import load_weights


@dataclass(frozen=True)
class BackboneSpec:
    """Everything needed to rebuild a backbone and feed it images.

    Attributes:
        name: timm model name, e.g. ``resnet10t``.
        in_chans: input channels the model takes.
        image_size: the square image size it was adapted to.
        mean: per-channel input mean in ``[0, 1]`` units (of the source images' channels).
        std: per-channel input standard deviation, same units.
        views: how features are read: the ``fewshot_med.models.views.VIEWS`` entry whose views'
            features are averaged (``identity``: the image as it is).
    """

    name: str
    in_chans: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    views: str = "identity"

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form, stored in checkpoints and logged to MLflow."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> BackboneSpec:
        """Inverse of ``to_dict``."""
        return cls(**{**values, "mean": tuple(values["mean"]), "std": tuple(values["std"])})


def _small_vit_kwargs(image_size: int) -> dict[str, Any]:
    """ViTs at 28-64 px: patches of 4 (≤ 32 px) or 8 pixels instead of 16."""
    if image_size > 64:
        return {}
    return {"img_size": image_size, "patch_size": 4 if image_size <= 32 else 8}


def _adapt_resnet(model: nn.Module, image_size: int) -> None:
    """Drop the stem max-pool at ≤ 32 px, keeping twice the spatial resolution.

    At 64 px the stock stem is kept: without the pool every layer costs 4x (measured on 2 CPU cores,
    resnet10t at 64 px trains at ~4x fewer images/s), which the base-class accuracy does not repay.
    """
    if image_size <= 32:
        model.maxpool = nn.Identity()


def _adapt_efficientnet(model: nn.Module, image_size: int) -> None:
    """Stem stride 1 at ≤ 32 px, so the last stage is not smaller than 1x1."""
    if image_size <= 32:
        model.conv_stem.stride = (1, 1)


def _adapt_convnext(model: nn.Module, image_size: int) -> None:
    """Replace the 4x4/stride-4 patchify stem by 2x2/stride 2 at ≤ 64 px (28 px would vanish)."""
    if image_size <= 64:
        stem = model.stem[0]
        model.stem[0] = nn.Conv2d(stem.in_channels, stem.out_channels, kernel_size=2, stride=2)


#: timm module -> (extra ``create_model`` kwargs, in-place adapter) for small inputs.
SMALL_INPUT_ADAPTERS: dict[str, tuple[Callable[[int], dict[str, Any]], Callable[[nn.Module, int], None]]] = {
    "resnet": (lambda size: {}, _adapt_resnet),
    "efficientnet": (lambda size: {}, _adapt_efficientnet),
    "convnext": (lambda size: {}, _adapt_convnext),
    "vision_transformer": (_small_vit_kwargs, lambda model, size: None),
}


@dataclass(frozen=True)
class TimmNames:
    """The names in timm's registry.

    Attributes:
        models: every name ``timm.is_model`` accepts without a tag: ``timm.list_models()`` and the
            deprecated aliases.
        pretrained: the names timm publishes weights for, with and without their tag (``resnet10t``,
            ``resnet10t.c3_in1k``; ``timm.list_pretrained()``).
    """

    models: frozenset[str]
    pretrained: frozenset[str]


@functools.cache
def timm_names() -> TimmNames:
    """timm's registry, cached per timm version in ``$XDG_CACHE_HOME/fewshot-med`` (``~/.cache``).

    Importing timm takes seconds (it imports torchvision, which imports torch's compiler), too long for
    checking a config before every command, and the names change only with timm's version.
    """
    cache = Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "fewshot-med")
    path = cache / f"timm-{importlib.metadata.version('timm')}-names.json"
    with contextlib.suppress(OSError, RuntimeError, ValueError, KeyError, TypeError):  # no home, no file
        stored = json.loads(path.expanduser().read_text(encoding="utf-8"))
        return TimmNames(frozenset(stored["models"]), frozenset(stored["pretrained"]))
    names = _read_timm_registry()
    with contextlib.suppress(OSError, RuntimeError):  # no cache where it cannot be written
        path = path.expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{os.getpid()}")
        partial.write_text(json.dumps({key: sorted(value) for key, value in asdict(names).items()}))
        partial.replace(path)
    return names


def _read_timm_registry() -> TimmNames:
    import timm

    deprecated = {old: new for old, new in timm.models.get_deprecated_models().items() if timm.is_model(old)}
    tagged = timm.list_pretrained()
    pretrained = {*tagged, *(name.split(".", 1)[0] for name in tagged)}
    pretrained |= {old for old, new in deprecated.items() if new in pretrained}
    return TimmNames(frozenset({*timm.list_models(), *deprecated}), frozenset(pretrained))


def check_backbone(name: str, pretrained: bool = False) -> None:
    """Refuse a ``name`` (``arch`` or ``arch.tag``) that is not in timm's registry (``timm_names``) and,
    when ``pretrained``, one timm publishes no weights for.

    Raises:
        FewshotMedError: naming ``name`` and the closest timm name.
    """
    names = timm_names()
    arch = name.split(".", 1)[0]
    pattern = f"'{re.match(r'[a-z]*', arch).group()}*'"
    if arch not in names.models:
        raise FewshotMedError(
            f"'{name}' is not a timm model (timm.list_models({pattern}) lists them)"
            f"{did_you_mean(arch, names.models)}"
        )
    if pretrained and name not in names.pretrained:
        raise FewshotMedError(
            f"timm publishes no pretrained weights for '{name}'; set model.pretrained: false, use "
            f"model.weights, or pick one of timm.list_pretrained({pattern})"
            f"{did_you_mean(name, names.pretrained)}"
        )


def _family(name: str) -> str:
    """The timm module a model name is defined in (``resnet``, ``convnext``, …), found without building it."""
    import timm

    check_backbone(name)
    return timm.models.model_entrypoint(name).__module__.rsplit(".", 1)[-1]


def create_backbone(
    name: str,
    in_chans: int = 3,
    image_size: int = 64,
    pretrained: bool = False,
    weights: str | Path | None = None,
) -> nn.Module:
    """Build a timm feature extractor adapted to ``image_size``.

    Args:
        name: timm model name (``resnet18``, ``resnet10t``, ``efficientnet_b0``, ``convnext_atto``,
            ``vit_tiny_patch16_224``, …).
        in_chans: input channels.
        image_size: input height and width; at ≤ 64 px the stem is adapted (see
            ``SMALL_INPUT_ADAPTERS``).
        pretrained: load timm's published weights through its hub (needs network or a warm cache).
        weights: starting weights loaded after the stem adaptation (``load_weights``): a local
            ``state_dict``, checkpoint or ``.safetensors`` file, or ``package:<distribution>``.

    Returns:
        Module mapping ``(N, in_chans, image_size, image_size)`` to ``(N, num_features)``.
    """
    import timm

    create_kwargs, adapt = SMALL_INPUT_ADAPTERS.get(_family(name), (lambda size: {}, None))
    kwargs = {"num_classes": 0, "in_chans": in_chans, **create_kwargs(image_size)}
    try:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except (OSError, RuntimeError) as error:
        if not pretrained:
            raise
        offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") else ""
        raise FewshotMedError(
            f"could not fetch timm weights for '{name}'{offline}: {str(error).splitlines()[0]}; "
            "download them once online into the Hugging Face cache (~/.cache/huggingface), "
            "or set model.weights to a local file"
        ) from None
    if adapt is not None:
        adapt(model, image_size)
    if weights is not None:
        load_weights(model, weights)
    return model
