"""Prior-regularised fine-tuning: L2-SP and the SWAG prior (values, Woodbury algebra, effect, errors)."""

from __future__ import annotations

import math
import pickle

import pytest
import torch
from torch import Tensor, nn

from fewshot_med.errors import ConfigError
from fewshot_med.methods import MethodContext, create_method
from fewshot_med.methods.finetune import FineTune
from fewshot_med.models import create_backbone
from fewshot_med.priors import L2SPPrior, SwagPosterior, SwagPrior

IMAGE_SIZE = 16
LR = 1e-2
#: Fast, deterministic fine-tuning of the last stage (no augmentation).
FAST = {"mode": "last_block", "steps": 10, "backbone_lr": LR, "augment": False}


@pytest.fixture(scope="module")
def backbone() -> nn.Module:
    torch.manual_seed(0)
    return create_backbone("resnet10t", image_size=IMAGE_SIZE).eval()


def posterior_at(module: nn.Module, prefix: str, offset: float = 0.0, rank: int = 3) -> SwagPosterior:
    """A SWAG posterior over ``module``'s parameters whose names start with ``prefix``: mean at their
    values plus ``offset`` (every coordinate), variance 1e-4, small random deviations."""
    params = [(name, p.detach()) for name, p in module.named_parameters() if name.startswith(prefix)]
    mean = torch.cat([p.reshape(-1) for _, p in params]) + offset
    generator = torch.Generator().manual_seed(1)
    return SwagPosterior(
        mean=mean,
        variance=torch.full_like(mean, 1e-4),
        deviations=1e-2 * torch.randn(rank, len(mean), generator=generator),
        n_snapshots=rank,
        names=tuple(name for name, _ in params),
        shapes=tuple(tuple(p.shape) for _, p in params),
    )


def distance(module: nn.Module, reference: dict[str, Tensor], prefix: str = "layer4.") -> float:
    """Largest coordinate difference between ``module``'s ``prefix`` parameters and ``reference``."""
    return max(
        (p - reference[name]).abs().max().item()
        for name, p in module.named_parameters()
        if name.startswith(prefix)
    )


def displacement(module: nn.Module, reference: dict[str, Tensor], prefix: str = "layer4.") -> float:
    """Euclidean norm of ``module``'s ``prefix`` parameters minus ``reference``."""
    parts = [
        (p - reference[name]).reshape(-1) for name, p in module.named_parameters() if name.startswith(prefix)
    ]
    return torch.cat(parts).norm().item()


def weights(module: nn.Module) -> dict[str, Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def record_optimisers(monkeypatch: pytest.MonkeyPatch, name: str) -> list[torch.optim.Optimizer]:
    """Replace ``torch.optim.<name>`` by a subclass that records every instance in the returned list."""
    optimisers: list[torch.optim.Optimizer] = []

    class Recorded(getattr(torch.optim, name)):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            optimisers.append(self)

    monkeypatch.setattr(torch.optim, name, Recorded)
    return optimisers


# --- no prior -------------------------------------------------------------------------------------


def test_no_prior_ignores_the_prior_settings_and_the_posterior(backbone, support) -> None:
    images, labels, query = support
    plain = MethodContext(backbone=backbone)
    with_posterior = MethodContext(backbone=backbone, swag=posterior_at(backbone, "layer4."))
    reference = create_method("finetune", plain, mode="full", steps=3).fit(images, labels)
    other = create_method(
        "finetune", with_posterior, mode="full", steps=3, prior="none", prior_weight=5.0, prior_scale=2.0
    ).fit(images, labels)
    assert torch.equal(reference.predict_logits(query), other.predict_logits(query))
    assert other.swag is not None and "swag" not in other.get_params()


# --- L2-SP ----------------------------------------------------------------------------------------


def test_l2sp_penalty_is_half_the_weighted_squared_distance_to_the_start() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(3, 2)
    start = {name: p.detach().clone() for name, p in layer.named_parameters()}
    prior = L2SPPrior(list(layer.named_parameters()), weight=0.3)
    assert prior.penalty().item() == 0.0
    with torch.no_grad():
        layer.weight.add_(torch.tensor([[1.0, 0.0, -2.0], [0.5, 0.0, 0.0]]))
        layer.bias.sub_(torch.tensor([0.0, 3.0]))
    expected = 0.3 / 2 * (1 + 4 + 0.25 + 9)
    assert prior.penalty().item() == pytest.approx(expected, rel=1e-6)
    prior.penalty().backward()
    torch.testing.assert_close(layer.weight.grad, 0.3 * (layer.weight - start["weight"]).detach())
    assert prior.names == ("weight", "bias")


def test_l2sp_weight_holds_the_weights_at_the_start(backbone, support) -> None:
    images, labels, _ = support
    context, start = MethodContext(backbone=backbone), weights(backbone)
    free = create_method("finetune", context, prior="l2sp", prior_weight=0.0, **FAST).fit(images, labels)
    held = create_method("finetune", context, prior="l2sp", prior_weight=1e6, **FAST).fit(images, labels)
    # Adam's steps are about LR whatever the loss scale, so "at θ₀" means within one step of it
    assert distance(free.backbone_, start) > 5 * LR
    assert distance(held.backbone_, start) < LR


@pytest.mark.parametrize(("prior", "covered"), [("l2sp", "layer4."), ("swag", "layer4.0.conv")])
def test_the_prior_replaces_weight_decay_on_the_parameters_it_covers(
    prior, covered, backbone, support, monkeypatch
) -> None:
    optimisers = record_optimisers(monkeypatch, "AdamW")
    context = MethodContext(backbone=backbone, swag=posterior_at(backbone, covered))
    images, labels, _ = support
    method = create_method("finetune", context, prior=prior, **{**FAST, "steps": 1}).fit(images, labels)
    names = {id(p): name for name, p in method.backbone_.named_parameters()}
    decay = {
        names[id(p)]: group["weight_decay"]
        for group in optimisers[0].param_groups[1:]
        for p in group["params"]
    }
    assert optimisers[0].param_groups[0]["weight_decay"] == 0.01  # the head keeps AdamW's default
    assert decay and all(name.startswith("layer4.") for name in decay)
    assert all(value == (0.0 if name.startswith(covered) else 0.01) for name, value in decay.items())


# --- SGD: the optimiser under which the prior's weight sets how far the weights move ----------------


def test_sgd_has_momentum_and_no_weight_decay(backbone, support, monkeypatch) -> None:
    optimisers = record_optimisers(monkeypatch, "SGD")
    images, labels, _ = support
    params = {**FAST, "steps": 1, "optimizer": "sgd", "lr": 0.5}
    create_method("finetune", MethodContext(backbone=backbone), prior="l2sp", **params).fit(images, labels)
    (optimiser,) = optimisers
    assert [group["lr"] for group in optimiser.param_groups] == [0.5, LR]  # head, then the block
    assert all(g["momentum"] == 0.9 and g["weight_decay"] == 0.0 for g in optimiser.param_groups)


def test_under_sgd_the_l2sp_weight_sets_how_far_the_weights_move(backbone, support) -> None:
    images, labels, _ = support
    context, start = MethodContext(backbone=backbone), weights(backbone)
    sgd = {**FAST, "optimizer": "sgd", "backbone_lr": 0.05, "steps": 20}
    moved = [
        displacement(
            create_method("finetune", context, prior="l2sp", prior_weight=weight, **sgd)
            .fit(images, labels)
            .backbone_,
            start,
        )
        for weight in (0.0, 1.0, 10.0)
    ]
    assert moved[0] > 0
    # Unlike Adam's normalised steps, SGD's shrink with the prior's pull: strictly less per weight,
    # and a strong prior holds the weights far closer than plain fine-tuning does.
    assert moved[0] > moved[1] > moved[2]
    assert moved[2] < 0.3 * moved[0]


# --- the SWAG prior -------------------------------------------------------------------------------


def dense_quadratic_form(posterior: SwagPosterior, scale: float, delta: Tensor, index: Tensor) -> Tensor:
    """δᵀ(scale·Σ)⁻¹δ with Σ = ½diag(σ²) + ½DᵀD/(K - 1) built densely and restricted to ``index``."""
    deviations = posterior.deviations.double()
    sigma = 0.5 * torch.diag(posterior.variance.double()) + 0.5 * deviations.T @ deviations / (
        posterior.rank - 1
    )
    sigma = scale * sigma[index][:, index]
    return delta @ torch.linalg.solve(sigma, delta)


def random_posterior(shapes: dict[str, tuple[int, ...]], rank: int, dtype: torch.dtype) -> SwagPosterior:
    size = sum(math.prod(shape) for shape in shapes.values())
    generator = torch.Generator().manual_seed(2)
    return SwagPosterior(
        mean=torch.randn(size, generator=generator, dtype=dtype),
        variance=0.5 + 1.5 * torch.rand(size, generator=generator, dtype=dtype),
        deviations=torch.randn(rank, size, generator=generator, dtype=dtype),
        n_snapshots=rank + 2,
        names=tuple(shapes),
        shapes=tuple(shapes.values()),
    )


@pytest.mark.parametrize(
    "given",
    [("a", "b", "c"), ("b",), ("a", "c"), ("c", "a")],  # all, one block, a gap, another order
)
def test_woodbury_quadratic_form_equals_the_dense_one(given: tuple[str, ...]) -> None:
    shapes = {"a": (2, 2), "b": (3,), "c": (3,)}  # P = 10
    posterior = random_posterior(shapes, rank=4, dtype=torch.float64)
    starts = {"a": 0, "b": 4, "c": 7}
    index = torch.cat([torch.arange(starts[n], starts[n] + math.prod(shapes[n])) for n in given])
    generator = torch.Generator().manual_seed(3)
    params = [(name, torch.randn(shapes[name], generator=generator, dtype=torch.float64)) for name in given]
    prior = SwagPrior(posterior, params, scale=7.5)
    assert prior.names == given
    delta = torch.cat([p.reshape(-1) for _, p in params]) - posterior.mean[index]
    expected = dense_quadratic_form(posterior, 7.5, delta, index)
    torch.testing.assert_close(prior.quadratic_form(delta), expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(prior.penalty(), 0.5 * expected, rtol=1e-6, atol=0)


def test_woodbury_in_float32_stays_close_to_the_dense_form() -> None:
    posterior = random_posterior({"w": (10,)}, rank=3, dtype=torch.float32)
    theta = torch.randn(10)
    prior = SwagPrior(posterior, [("w", theta)], scale=2.0)
    expected = dense_quadratic_form(posterior, 2.0, (theta - posterior.mean).double(), torch.arange(10))
    assert prior.penalty().dtype == torch.float32
    assert prior.penalty().item() == pytest.approx(0.5 * expected.item(), rel=1e-4)


def test_swag_prior_of_small_scale_pulls_to_the_mean_and_of_large_scale_does_nothing(backbone, support):
    images, labels, _ = support
    posterior = posterior_at(backbone, "layer4.", offset=0.03)
    mean = {name: value for name, value in posterior.unflatten(posterior.mean).items()}
    context = MethodContext(backbone=backbone, swag=posterior)
    plain = create_method("finetune", context, **FAST).fit(images, labels)
    tight = create_method("finetune", context, prior="swag", prior_scale=1e-6, **FAST).fit(images, labels)
    loose = create_method("finetune", context, prior="swag", prior_scale=1e16, **FAST).fit(images, labels)
    assert distance(tight.backbone_, mean) < LR < distance(plain.backbone_, mean)
    # At 16 px layer4 sees 1x1 maps: 8 of 9 kernel taps get no cross-entropy gradient, and Adam turns
    # any prior gradient there into steps of up to LR; at a huge scale it is too small for that.
    moved = displacement(plain.backbone_, weights(backbone))
    assert displacement(loose.backbone_, weights(plain.backbone_)) < 0.05 * moved


def test_a_fitted_method_pickles_without_the_posterior(backbone, support) -> None:
    images, labels, query = support
    context = MethodContext(backbone=backbone, swag=posterior_at(backbone, "layer4."))
    method = create_method("finetune", context, prior="swag", **{**FAST, "steps": 1}).fit(images, labels)
    restored = pickle.loads(pickle.dumps(method))
    assert restored.swag is None and method.swag is not None
    assert torch.equal(restored.predict_logits(query), method.predict_logits(query))


# --- errors ---------------------------------------------------------------------------------------


def test_swag_prior_without_a_posterior_says_how_to_get_one(backbone) -> None:
    with pytest.raises(ConfigError, match=r"method 'finetune': prior 'swag' needs the SWAG posterior.*"
                       r"set pretrain\.swag\.enabled: true"):  # fmt: skip
        create_method("finetune", MethodContext(backbone=backbone), mode="full", prior="swag")


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"prior": "gaussian"}, "prior must be one of none, l2sp, swag, got 'gaussian'"),
        ({"optimizer": "adam"}, "optimizer must be one of adamw, sgd, got 'adam'"),
        ({"prior": "l2sp", "prior_weight": -1.0}, "prior_weight must be a number ≥ 0"),
        ({"prior": "swag", "prior_scale": 0.0}, "prior_scale must be a positive number"),
        ({"prior": "l2sp", "mode": "head"}, "prior 'l2sp' acts on the trainable backbone parameters"),
    ],
)
def test_invalid_prior_parameters(params: dict, message: str, backbone) -> None:
    context = MethodContext(backbone=backbone, swag=posterior_at(backbone, "layer4."))
    with pytest.raises(ConfigError, match=f"method 'finetune': {message}"):
        create_method("finetune", context, **{"mode": "full", **params})


def test_the_posterior_is_not_a_config_parameter(backbone) -> None:
    assert "swag" not in FineTune.hyperparameter_names()
    with pytest.raises(ConfigError, match="method 'finetune' has no parameter swag"):
        create_method("finetune", MethodContext(backbone=backbone), swag=None)


def test_posterior_of_another_architecture_is_refused(backbone) -> None:
    context = MethodContext(backbone=backbone, swag=posterior_at(nn.Linear(3, 2), ""))
    with pytest.raises(ConfigError, match="the SWAG posterior covers none of the backbone's parameters"):
        create_method("finetune", context, mode="full", prior="swag")


def test_posterior_covering_no_trainable_parameter_is_refused_at_fit(backbone, support) -> None:
    images, labels, _ = support
    first = next(name for name, _ in backbone.named_parameters())  # in the stem: frozen in last_block
    context = MethodContext(backbone=backbone, swag=posterior_at(backbone, first))
    method = create_method("finetune", context, prior="swag", **FAST)
    with pytest.raises(ValueError, match=r"SwagPrior: the posterior covers none of the \d+ parameters"):
        method.fit(images, labels)


def test_swag_prior_refuses_a_shape_mismatch() -> None:
    posterior = random_posterior({"w": (10,)}, rank=2, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"parameter w has shape \[2, 5\], the posterior's \[10\]"):
        SwagPrior(posterior, [("w", torch.zeros(2, 5))], scale=1.0)
