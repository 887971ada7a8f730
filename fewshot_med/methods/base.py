"""The few-shot method interface, its registry and factory.

A method follows scikit-learn's estimator contract: ``__init__`` only stores parameters, ``fit``
validates them and the support set and returns ``self``, learned state sits in attributes ending in
``_``. What the pipeline knows (the backbone, the base-class mean feature, the device) reaches a
method through a ``MethodContext`` and ``from_context``; the config supplies the rest as parameters.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from numbers import Integral, Real
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewshot_med.errors import ConfigError
from fewshot_med.models.backbone import BackboneSpec

if TYPE_CHECKING:
    from typing_extensions import Self


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
    """

    base_feature_mean: Tensor | None = None
    backbone: nn.Module | None = None
    spec: BackboneSpec | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0


class FewShotMethod(ABC):
    """A few-shot classifier: ``fit`` on a labelled support set, then score queries.

    Subclasses implement ``_fit`` and ``_predict_logits`` on validated tensors and, when they have
    parameters, ``check_params``. Names in ``context_params`` are ``__init__`` arguments filled from
    the ``MethodContext`` field of the same name rather than from the config. ``name`` is the registry
    name, set by ``register_method``.

    Attributes:
        n_way_: number of classes seen by ``fit``.
        input_shape_: per-sample shape seen by ``fit``: ``(D,)`` or ``(C, H, W)``.
    """

    name: ClassVar[str]
    inputs: ClassVar[Literal["features", "images"]]
    context_params: ClassVar[tuple[str, ...]] = ()

    n_way_: int
    input_shape_: tuple[int, ...]

    @classmethod
    def from_context(cls, context: MethodContext, **params: Any) -> Self:
        """Build the method from config ``params`` and the context fields named in ``context_params``."""
        values = {name: getattr(context, name) for name in cls.context_params}
        missing = [name for name, value in values.items() if value is None]
        if missing:
            raise ConfigError(
                f"method '{cls.name}' needs the pipeline to provide {', '.join(missing)}; "
                "it is not available in this run"
            )
        return cls(**values, **params)

    @classmethod
    def hyperparameter_names(cls) -> list[str]:
        """The ``__init__`` arguments a config may set (all but the context parameters)."""
        parameters = list(inspect.signature(cls.__init__).parameters.values())[1:]
        named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        return [p.name for p in parameters if p.kind in named and p.name not in cls.context_params]

    def get_params(self) -> dict[str, Any]:
        """The hyperparameters as set (defaults included), e.g. for logging."""
        return {name: getattr(self, name) for name in self.hyperparameter_names()}

    def check_params(self) -> None:  # noqa: B027 (methods without parameters keep this no-op)
        """Raise ``ValueError`` naming the first invalid parameter."""

    def fit(self, support: Tensor, labels: Tensor) -> Self:
        """Adapt to a support set.

        Args:
            support: ``(n_support, D)`` features or ``(n_support, C, H, W)`` normalised images,
                following ``inputs``.
            labels: ``(n_support,)`` integer labels; the classes are exactly ``0 .. n_way - 1``.

        Returns:
            ``self``, fitted.
        """
        self.check_params()
        support, labels = self._check_support(support, labels)
        self.n_way_ = int(labels.max()) + 1
        self.input_shape_ = tuple(support.shape[1:])
        self._fit(support, labels)
        return self

    def predict_logits(self, query: Tensor) -> Tensor:
        """Score queries: ``(n_query, ...)`` as in ``fit`` -> ``(n_query, n_way)`` float32 CPU logits.

        A softmax over the last dimension gives the class probabilities.
        """
        if not hasattr(self, "n_way_"):
            raise NotFittedError(f"{self.name} is not fitted; call fit(support, labels) first")
        if not isinstance(query, Tensor) or tuple(query.shape[1:]) != self.input_shape_:
            shape = getattr(query, "shape", type(query).__name__)
            raise ValueError(
                f"{self.name}: query must be a tensor of shape (n_query, "
                f"{', '.join(map(str, self.input_shape_))}) like the support set, got {shape}"
            )
        return self._predict_logits(query).float().cpu()

    @abstractmethod
    def _fit(self, support: Tensor, labels: Tensor) -> None:
        """Learn from validated ``support`` and ``labels``; ``n_way_`` is already set."""

    @abstractmethod
    def _predict_logits(self, query: Tensor) -> Tensor:
        """``(n_query, n_way)`` logits for a validated query batch."""

    def _check_support(self, support: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        name = self.name
        ndim, layout = (2, "(n_support, D)") if self.inputs == "features" else (4, "(n_support, C, H, W)")
        if (
            not isinstance(support, Tensor)
            or support.ndim != ndim
            or not support.is_floating_point()
            or len(support) == 0
        ):
            shape = getattr(support, "shape", type(support).__name__)
            raise ValueError(f"{name}: support must be a float tensor of shape {layout}, got {shape}")
        labels = torch.as_tensor(labels)
        if labels.shape != (len(support),) or labels.is_floating_point() or labels.dtype == torch.bool:
            raise ValueError(
                f"{name}: labels must be {len(support)} integers, one per support sample, "
                f"got {labels.dtype} of shape {tuple(labels.shape)}"
            )
        labels = labels.to(device=support.device, dtype=torch.long)
        classes = labels.unique().tolist()
        if classes != list(range(len(classes))) or len(classes) < 2:
            raise ValueError(
                f"{name}: labels must be 0 .. n_way - 1 with every class present and n_way ≥ 2, "
                f"got classes {classes}"
            )
        return support, labels


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
        ConfigError: unknown name, unknown or invalid parameter, or missing context.
    """
    if name not in METHODS:
        raise ConfigError(f"unknown few-shot method '{name}'; known methods: {', '.join(sorted(METHODS))}")
    cls = METHODS[name]
    allowed = cls.hyperparameter_names()
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ConfigError(
            f"method '{name}' has no parameter {', '.join(unknown)}; "
            f"its parameters: {', '.join(allowed) or 'none'}"
        )
    method = cls.from_context(context, **params)
    try:
        method.check_params()
    except ValueError as error:
        raise ConfigError(f"method '{name}': {error}") from None
    return method


def class_means(features: Tensor, labels: Tensor, n_way: int) -> Tensor:
    """Per-class mean of ``(n, D)`` features with labels in ``0 .. n_way - 1`` -> ``(n_way, D)``."""
    one_hot = F.one_hot(labels, n_way).to(features.dtype)
    return (one_hot.T @ features) / one_hot.sum(dim=0).unsqueeze(1)


def require_positive(name: str, value: object, integer: bool = False) -> None:
    """Raise ``ValueError`` unless ``value`` is a positive number (an integer if ``integer``)."""
    kind = Integral if integer else Real
    if isinstance(value, bool) or not isinstance(value, kind) or not value > 0:
        expected = "a positive integer" if integer else "a positive number"
        raise ValueError(f"{name} must be {expected}, got {value!r}")


def require_choice(name: str, value: object, choices: Sequence[object]) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(str, choices))}, got {value!r}")


def require_bool(name: str, value: object) -> None:
    """Raise ``ValueError`` unless ``value`` is ``True`` or ``False``."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
