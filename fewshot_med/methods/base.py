"""The few-shot method interface, its registry and factory.

A method follows scikit-learn's estimator contract: ``__init__`` only stores parameters, ``fit``
validates them and the support set and returns ``self``, learned state sits in attributes ending in
``_``. What the pipeline knows (the backbone, the base-class mean feature, the device) reaches a
method through a ``MethodContext`` and ``from_context``; the config supplies the rest as parameters.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from numbers import Integral, Real
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewshot_med.errors import ConfigError, did_you_mean, not_one_of
from fewshot_med.models.backbone import BackboneSpec
from fewshot_med.models.feature_transforms import FEATURE_TRANSFORMS, needs_base_mean, transform_features

if TYPE_CHECKING:
    from typing_extensions import Self

    from fewshot_med.priors import SwagPosterior


class NotFittedError(ValueError, AttributeError):
    """``predict_logits`` was called before ``fit`` (the same bases as scikit-learn's)."""


@dataclass(frozen=True)
class MethodContext:
    """What the pipeline knows about a run; each method takes what it needs.

    Attributes:
        base_feature_mean: ``(D,)`` mean feature of the base-class train images (SimpleShot centring).
        backbone: the (pre/meta-)trained backbone, mapping ``(N, C, H, W)`` to ``(N, D)``; methods
            that fine-tune work on a copy.
        spec: how the backbone's inputs were built (channels, size, normalisation).
        device: where image methods run.
        seed: the run's seed; the default ``random_state`` of randomised methods.
        swag: the SWAG posterior over the pretrained backbone's weights (``pretrain.swag``), the
            informative prior of prior-regularised fine-tuning; ``None`` when pretraining collected none.
    """

    base_feature_mean: Tensor | None = None
    backbone: nn.Module | None = None
    spec: BackboneSpec | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0
    swag: SwagPosterior | None = None


class FewShotMethod(ABC):
    """A few-shot classifier: ``fit`` on a labelled support set, then score queries.

    Subclasses implement ``_fit`` and ``_predict_logits`` on validated tensors and, when they have
    parameters, ``check_params``. Names in ``context_params`` are ``__init__`` arguments filled from
    the ``MethodContext`` field of the same name rather than from the config; names in
    ``optional_context_params`` likewise, but only when the context has them (a field some parameter
    values need: ``check_context`` says which). ``name`` is the registry name, set by ``register_method``.

    Frozen-feature methods (``inputs == "features"``) also take many episodes at once: support
    ``(E, n_support, D)`` with labels ``(E, n_support)`` fits ``E`` independent classifiers, and query
    ``(E, n_query, D)`` is scored by the classifier of its episode. Their ``_fit`` and
    ``_predict_logits`` always see this batched layout (a single episode arrives as ``E = 1``), so
    evaluating 600 episodes is a few tensor operations, not 600 fits. Image methods take one episode.

    Attributes:
        n_way_: number of classes seen by ``fit`` (the same in every episode).
        input_shape_: per-sample shape seen by ``fit``: ``(D,)`` or ``(C, H, W)``.
        n_episodes_: ``E`` when fitted on a batch of episodes, ``None`` for a single support set.
    """

    name: ClassVar[str]
    inputs: ClassVar[Literal["features", "images"]]
    #: Reads the episode's queries while adapting (``predict_logits`` infers over the whole query
    #: batch it is given, so a query's logits depend on the other queries): evaluated on per-episode
    #: queries only, never calibrated by leave-one-out, never registered as a per-file classifier.
    transductive: ClassVar[bool] = False
    context_params: ClassVar[tuple[str, ...]] = ()
    optional_context_params: ClassVar[tuple[str, ...]] = ()

    n_way_: int
    input_shape_: tuple[int, ...]
    n_episodes_: int | None

    @classmethod
    def from_context(cls, context: MethodContext, **params: Any) -> Self:
        """Build the method from config ``params``, the context fields named in ``context_params`` and
        those named in ``optional_context_params`` that the context holds."""
        values = {name: getattr(context, name) for name in cls.context_params}
        missing = [name for name, value in values.items() if value is None]
        if missing:
            raise ConfigError(
                f"method '{cls.name}' needs the pipeline to provide {', '.join(missing)}; "
                "it is not available in this run"
            )
        optional = {name: getattr(context, name) for name in cls.optional_context_params}
        values.update({name: value for name, value in optional.items() if value is not None})
        return cls(**values, **params)

    @classmethod
    def hyperparameter_names(cls) -> list[str]:
        """The ``__init__`` arguments a config may set (all but the context parameters)."""
        parameters = list(inspect.signature(cls.__init__).parameters.values())[1:]
        named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        from_context = {*cls.context_params, *cls.optional_context_params}
        return [p.name for p in parameters if p.kind in named and p.name not in from_context]

    def get_params(self) -> dict[str, Any]:
        """The hyperparameters as set (defaults included), e.g. for logging."""
        return {name: getattr(self, name) for name in self.hyperparameter_names()}

    @classmethod
    def validate_params(cls, params: Mapping[str, Any]) -> None:
        """Check config ``params`` before any work, without a run: their names against
        ``hyperparameter_names``, their values by ``check_params`` on an instance whose context
        parameters are unset.

        Raises:
            ConfigError: naming the first unknown or invalid parameter.
        """
        allowed = cls.hyperparameter_names()
        unknown = [str(name) for name in params if name not in allowed]
        if unknown:
            raise ConfigError(
                f"method '{cls.name}' has no parameter {', '.join(unknown)}; "
                f"its parameters: {', '.join(allowed) or 'none'}{did_you_mean(unknown[0], allowed)}"
            )
        try:
            cls(**dict.fromkeys(cls.context_params), **params).check_params()
        except ValueError as error:
            raise ConfigError(f"method '{cls.name}': {error}") from None

    def check_params(self) -> None:  # noqa: B027 (methods without parameters keep this no-op)
        """Raise ``ValueError`` naming the first invalid hyperparameter; context parameters may be unset."""

    def check_context(self) -> None:  # noqa: B027 (methods without context needs keep this no-op)
        """Raise ``ValueError`` when the context parameters do not suit the hyperparameters."""

    def fit(self, support: Tensor, labels: Tensor) -> Self:
        """Adapt to a support set (or, for frozen-feature methods, to a batch of them).

        Args:
            support: ``(n_support, D)`` features or ``(n_support, C, H, W)`` normalised images,
                following ``inputs``; frozen-feature methods also take ``(E, n_support, D)``.
            labels: ``(n_support,)`` (or ``(E, n_support)``) integer labels; in every episode the
                classes are exactly ``0 .. n_way - 1``.

        Returns:
            ``self``, fitted.
        """
        self.check_params()
        self.check_context()
        support, labels = self._check_support(support, labels)
        batched = self.inputs == "features" and support.ndim == 3
        self.n_episodes_ = len(support) if batched else None
        self.n_way_ = int(labels.max()) + 1
        self.input_shape_ = tuple(support.shape[-1:] if self.inputs == "features" else support.shape[1:])
        if self.inputs == "features" and not batched:
            support, labels = support.unsqueeze(0), labels.unsqueeze(0)
        self._fit(support, labels)
        return self

    def predict_logits(self, query: Tensor) -> Tensor:
        """Score queries: ``(n_query, ...)`` as in ``fit`` -> ``(n_query, n_way)`` float32 CPU logits.

        After a batched ``fit``, ``(E, n_query, D)`` -> ``(E, n_query, n_way)``, and ``(N, D)`` queries
        shared by all episodes -> ``(E, N, n_way)`` (broadcast, without copying them per episode; a
        transductive method infers over those ``N`` queries in every episode). A softmax over the last
        dimension gives the class probabilities.
        """
        if not hasattr(self, "n_way_"):
            raise NotFittedError(f"{self.name} is not fitted; call fit(support, labels) first")
        shared = isinstance(query, Tensor) and query.ndim == 2 and tuple(query.shape[1:]) == self.input_shape_
        if self.n_episodes_ is not None and shared:
            if self.transductive:  # every episode infers over the same N queries
                return self._predict_logits(query.expand(self.n_episodes_, *query.shape)).float().cpu()
            return self._predict_logits(query.unsqueeze(0)).float().cpu()
        lead = () if self.n_episodes_ is None else (self.n_episodes_,)
        expected = (*lead, "n_query", *self.input_shape_)
        if (
            not isinstance(query, Tensor)
            or query.ndim != len(expected)
            or tuple(query.shape[: len(lead)]) != lead
            or tuple(query.shape[len(lead) + 1 :]) != self.input_shape_
        ):
            shape = getattr(query, "shape", type(query).__name__)
            layout = ", ".join(map(str, expected))
            raise ValueError(
                f"{self.name}: query must be a tensor of shape ({layout}) like the support set, got {shape}"
            )
        if self.inputs == "features" and self.n_episodes_ is None:
            return self._predict_logits(query.unsqueeze(0))[0].float().cpu()
        return self._predict_logits(query).float().cpu()

    @abstractmethod
    def _fit(self, support: Tensor, labels: Tensor) -> None:
        """Learn from validated ``support`` and ``labels``; ``n_way_`` is already set.

        Frozen-feature methods get ``(E, n_support, D)`` and ``(E, n_support)``; image methods
        ``(n_support, C, H, W)`` and ``(n_support,)``.
        """

    @abstractmethod
    def _predict_logits(self, query: Tensor) -> Tensor:
        """Logits of a validated query batch: ``(E, n_query, n_way)`` for frozen-feature methods (from
        ``(E, n_query, D)``, or from ``(1, N, D)`` shared queries, broadcast over the episodes),
        ``(n_query, n_way)`` for image methods."""

    def _check_support(self, support: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        name = self.name
        if self.inputs == "features":
            ndims, layout = (2, 3), "(n_support, D) or (E, n_support, D)"
        else:
            ndims, layout = (4,), "(n_support, C, H, W)"
        if (
            not isinstance(support, Tensor)
            or support.ndim not in ndims
            or not support.is_floating_point()
            or support.shape[-2 if self.inputs == "features" else 0] == 0
        ):
            shape = getattr(support, "shape", type(support).__name__)
            raise ValueError(f"{name}: support must be a float tensor of shape {layout}, got {shape}")
        labels = torch.as_tensor(labels)
        label_shape = tuple(support.shape[:-1]) if self.inputs == "features" else (len(support),)
        if tuple(labels.shape) != label_shape or labels.is_floating_point() or labels.dtype == torch.bool:
            raise ValueError(
                f"{name}: labels must be integers of shape {label_shape}, one per support sample, "
                f"got {labels.dtype} of shape {tuple(labels.shape)}"
            )
        labels = labels.to(device=support.device, dtype=torch.long)
        n_way = int(labels.max()) + 1
        per_episode = labels.reshape(-1, labels.shape[-1])
        counts = F.one_hot(per_episode.clamp(min=0), n_way).sum(dim=1) if labels.min() >= 0 else None
        if counts is None or n_way < 2 or not bool((counts > 0).all()):
            classes = labels.unique().tolist()
            raise ValueError(
                f"{name}: labels must be 0 .. n_way - 1 with every class present in every episode and "
                f"n_way ≥ 2, got classes {classes}"
            )
        return support, labels


class TransductiveMethod(FewShotMethod):
    """A frozen-feature method that infers over its episode's queries (``transductive``).

    ``fit`` only keeps the support set under the ``features`` transform; ``_predict_logits`` adapts to
    the query batch it is given, so it holds the method's work. Subclasses set ``features`` and
    ``base_feature_mean`` in ``__init__`` and extend ``check_params``.

    Attributes:
        support_: ``(E, n_support, D)`` transformed support features.
        labels_: ``(E, n_support)`` their labels.
    """

    inputs = "features"
    transductive = True
    optional_context_params = ("base_feature_mean",)
    features: str
    base_feature_mean: Tensor | None

    def check_params(self) -> None:
        require_feature_transform(self.features)

    def check_context(self) -> None:
        require_base_mean_for(self.features, self.base_feature_mean)

    def _fit(self, support: Tensor, labels: Tensor) -> None:
        self.support_ = transform_features(self.features, support, self.base_feature_mean)
        self.labels_ = labels

    def _transform_queries(self, query: Tensor) -> Tensor:
        """``(E, n_query, D)`` queries under the support's transform, on its device."""
        return transform_features(self.features, query.to(self.support_.device), self.base_feature_mean)


_M = TypeVar("_M", bound=type[FewShotMethod])

#: Few-shot methods by registry name, filled by ``register_method``.
METHODS: dict[str, type[FewShotMethod]] = {}


def register_method(name: str) -> Callable[[_M], _M]:
    """Class decorator adding a method to ``METHODS`` under ``name``."""

    def decorator(cls: _M) -> _M:
        if name in METHODS:
            raise ValueError(f"method name '{name}' is already registered by {METHODS[name].__name__}")
        cls.name = name
        METHODS[name] = cls
        return cls

    return decorator


def create_method(name: str, context: MethodContext, **params: Any) -> FewShotMethod:
    """Build a registered method from its name, the run's context and config parameters.

    Args:
        name: registry name (a key of ``METHODS``).
        context: what the pipeline provides (backbone, base mean feature, device, seed).
        **params: the method's hyperparameters; unset ones keep their defaults.

    Returns:
        The unfitted method.

    Raises:
        ConfigError: unknown name, unknown or invalid parameter, missing or unsuitable context.
    """
    if name not in METHODS:
        raise ConfigError(not_one_of(name, "few-shot method", METHODS))
    cls = METHODS[name]
    cls.validate_params(params)
    method = cls.from_context(context, **params)
    try:
        method.check_context()
    except ValueError as error:
        raise ConfigError(f"method '{name}': {error}") from None
    return method


def class_means(features: Tensor, labels: Tensor, n_way: int) -> Tensor:
    """Per-class mean of ``(..., n, D)`` features with ``(..., n)`` labels in ``0 .. n_way - 1``
    -> ``(..., n_way, D)`` (leading axes, e.g. episodes, are kept)."""
    one_hot = F.one_hot(labels, n_way).to(features.dtype)
    return (one_hot.transpose(-1, -2) @ features) / one_hot.sum(dim=-2).unsqueeze(-1)


def episode_matmul(queries: Tensor, weights: Tensor) -> Tensor:
    """``(E, n, D) @ (E, D, m) -> (E, n, m)``; queries ``(1, n, D)`` shared by all episodes run as one
    ``(n, D) @ (D, E·m)`` matrix product instead of ``E`` copies of them."""
    if queries.shape[0] == 1 and weights.shape[0] > 1:
        return torch.einsum("nd,edm->enm", queries[0], weights)
    return queries @ weights


def euclidean_distances(queries: Tensor, centres: Tensor, squared: bool = False) -> Tensor:
    """Distances from ``(..., n, D)`` queries to ``(..., m, D)`` centres -> ``(..., n, m)``.

    Expands ``‖q‖² + ‖c‖² - 2 q·c`` into one batched matrix product (``torch.cdist`` is several times
    slower on many small batches), clamped at 0 against rounding.
    """
    squares = (
        queries.square().sum(dim=-1, keepdim=True)
        + centres.square().sum(dim=-1).unsqueeze(-2)
        - 2 * episode_matmul(queries, centres.transpose(-1, -2))
    ).clamp(min=0)
    return squares if squared else squares.sqrt()


def require_positive(name: str, value: object, integer: bool = False) -> None:
    """Raise ``ValueError`` unless ``value`` is a positive number (an integer if ``integer``)."""
    kind = Integral if integer else Real
    if isinstance(value, bool) or not isinstance(value, kind) or not value > 0:
        expected = "a positive integer" if integer else "a positive number"
        raise ValueError(f"{name} must be {expected}, got {value!r}")


def require_non_negative(name: str, value: object) -> None:
    """Raise ``ValueError`` unless ``value`` is a number ≥ 0."""
    if isinstance(value, bool) or not isinstance(value, Real) or not value >= 0:
        raise ValueError(f"{name} must be a number ≥ 0, got {value!r}")


def require_choice(name: str, value: object, choices: Sequence[object]) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``choices`` (suggesting the closest)."""
    if value not in choices:
        names = [str(choice) for choice in choices]
        hint = did_you_mean(value, names)
        raise ValueError(f"{name} must be one of {', '.join(names)}, got {value!r}{hint}")


def require_bool(name: str, value: object) -> None:
    """Raise ``ValueError`` unless ``value`` is ``True`` or ``False``."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")


def require_feature_transform(name: object) -> None:
    """Raise ``ValueError`` unless ``name`` is a ``FEATURE_TRANSFORMS`` entry (``check_params``)."""
    require_choice("features", name, tuple(FEATURE_TRANSFORMS))


def require_base_mean_for(name: str, base_feature_mean: Tensor | None) -> None:
    """Raise ``ValueError`` when the transform ``name`` centres but the run has no base-class mean
    feature (``check_context``)."""
    if needs_base_mean(name) and base_feature_mean is None:
        raise ValueError(f"features '{name}' needs the base-class mean feature, which this run does not have")
