"""Every registered few-shot method passes the same contract tests, plus hand-computed checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from torch import Tensor, nn

from fewshot_med.errors import ConfigError
from fewshot_med.methods import METHODS, FewShotMethod, MethodContext, NotFittedError, create_method
from fewshot_med.methods.base import register_method
from fewshot_med.methods.finetune import last_stage
from fewshot_med.models import create_backbone

DIM = 32
IMAGE_SIZE = 16
#: Quicker settings where the defaults are slow; the defaults are used otherwise.
FAST_PARAMS = {"finetune": {"steps": 3}}
NAMES = sorted(METHODS)


@pytest.fixture(scope="module")
def context() -> MethodContext:
    torch.manual_seed(0)
    backbone = create_backbone("resnet10t", image_size=IMAGE_SIZE).eval()
    return MethodContext(base_feature_mean=torch.full((DIM,), 2.0), backbone=backbone, seed=0)


def make(name: str, context: MethodContext, **params: object) -> FewShotMethod:
    return create_method(name, context, **{**FAST_PARAMS.get(name, {}), **params})


def feature_task(n_way: int, k_shot: int, n_query: int, seed: int = 0) -> tuple[Tensor, ...]:
    """Gaussian clusters in ``DIM`` dimensions around 2 (so centring matters), well separated."""
    generator = torch.Generator().manual_seed(seed)
    centres = 2.0 + 3.0 * torch.randn(n_way, DIM, generator=generator)

    def draw(per_class: int) -> tuple[Tensor, Tensor]:
        labels = torch.arange(n_way).repeat_interleave(per_class)
        return centres[labels] + torch.randn(len(labels), DIM, generator=generator), labels

    return (*draw(k_shot), *draw(n_query))


def image_task(n_way: int, k_shot: int, n_query: int, seed: int = 0) -> tuple[Tensor, ...]:
    """Normalised ``(n, 3, 16, 16)`` images: each class has its own colour, plus pixel noise."""
    generator = torch.Generator().manual_seed(seed)
    colours = 1.5 * torch.randn(n_way, 3, 1, 1, generator=generator)

    def draw(per_class: int) -> tuple[Tensor, Tensor]:
        labels = torch.arange(n_way).repeat_interleave(per_class)
        noise = 0.3 * torch.randn(len(labels), 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
        return colours[labels] + noise, labels

    return (*draw(k_shot), *draw(n_query))


def task(name: str, n_way: int = 3, k_shot: int = 5, n_query: int = 10, seed: int = 0) -> tuple[Tensor, ...]:
    """``(support, support_labels, query, query_labels)`` in the input kind the method takes."""
    make_task = feature_task if METHODS[name].inputs == "features" else image_task
    return make_task(n_way, k_shot, n_query, seed)


# --- the contract, for every registered method --------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("n_way", [2, 3, 4, 5])
def test_logits_shape_dtype_finite(name: str, n_way: int, context: MethodContext) -> None:
    support, labels, query, _ = task(name, n_way=n_way, k_shot=2, n_query=3)
    logits = make(name, context).fit(support, labels).predict_logits(query)
    assert logits.shape == (3 * n_way, n_way)
    assert logits.dtype == torch.float32 and logits.device.type == "cpu"
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", NAMES)
def test_deterministic(name: str, context: MethodContext) -> None:
    support, labels, query, _ = task(name, k_shot=2, n_query=3)
    first = make(name, context).fit(support, labels).predict_logits(query)
    second = make(name, context).fit(support, labels).predict_logits(query)
    assert torch.equal(first, second)


@pytest.mark.parametrize("name", NAMES)
def test_beats_chance_on_an_easy_task(name: str, context: MethodContext) -> None:
    support, labels, query, query_labels = task(name, n_way=4, k_shot=5, n_query=15, seed=1)
    predicted = make(name, context).fit(support, labels).predict_logits(query).argmax(dim=1)
    assert (predicted == query_labels).float().mean() > 0.8  # chance is 0.25


@pytest.mark.parametrize("name", NAMES)
def test_fit_returns_self_and_predict_needs_fit(name: str, context: MethodContext) -> None:
    support, labels, query, _ = task(name, k_shot=1, n_query=1)
    method = make(name, context)
    with pytest.raises(NotFittedError, match="not fitted; call fit"):
        method.predict_logits(query)
    assert method.fit(support, labels) is method
    assert method.n_way_ == 3
    with pytest.raises(ValueError, match="query must be a tensor of shape"):
        method.predict_logits(query[:, :-1])


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    ("labels", "message"),
    [
        ([0, 1, -1], "labels must be 0 .. n_way - 1"),
        ([0, 2, 2], "labels must be 0 .. n_way - 1"),  # class 1 missing
        ([1, 1, 1], "labels must be 0 .. n_way - 1"),
        ([0, 0, 0], "n_way ≥ 2"),
        ([0, 1], r"labels must be integers of shape \(3,\)"),
        ([0.0, 1.0, 1.0], r"labels must be integers of shape \(3,\)"),
    ],
)
def test_invalid_labels_raise(name: str, labels: list[float], message: str, context: MethodContext) -> None:
    support = task(name, k_shot=1)[0]
    with pytest.raises(ValueError, match=message):
        make(name, context).fit(support, torch.tensor(labels))


@pytest.mark.parametrize("name", NAMES)
def test_support_of_the_wrong_kind_raises(name: str, context: MethodContext) -> None:
    support, labels = task(name, k_shot=1)[:2]
    with pytest.raises(ValueError, match="support must be a float tensor of shape"):
        make(name, context).fit(support[:, None, None], labels)


FEATURE_NAMES = [name for name in NAMES if METHODS[name].inputs == "features"]


@pytest.mark.parametrize("name", FEATURE_NAMES)
def test_a_batch_of_episodes_equals_one_fit_per_episode(name: str, context: MethodContext) -> None:
    episodes = [task(name, k_shot=2, n_query=4, seed=seed) for seed in range(4)]
    support, labels, query = (torch.stack([e[i] for e in episodes]) for i in range(3))
    labels[1] = labels[1].flip(0)  # episodes need not share a label order
    batched = make(name, context).fit(support, labels)
    assert batched.n_episodes_ == 4
    logits = batched.predict_logits(query)
    assert logits.shape == (4, 12, 3) and logits.dtype == torch.float32
    for index in range(4):
        alone = make(name, context).fit(support[index], labels[index]).predict_logits(query[index])
        torch.testing.assert_close(logits[index], alone, rtol=1e-5, atol=1e-5)
    shared = batched.predict_logits(query[2])  # (n_query, D) shared by all episodes
    assert shared.shape == (4, 12, 3)
    torch.testing.assert_close(shared[2], logits[2], rtol=1e-5, atol=1e-5)
    alone = make(name, context).fit(support[0], labels[0]).predict_logits(query[2])
    torch.testing.assert_close(shared[0], alone, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="query must be a tensor of shape"):
        batched.predict_logits(query[:, :, :-1])


@pytest.mark.parametrize("name", FEATURE_NAMES)
def test_every_episode_of_a_batch_needs_every_class(name: str, context: MethodContext) -> None:
    support, labels = task(name, k_shot=2)[:2]
    labels = torch.stack([labels, torch.tensor([0, 0, 2, 2, 0, 2])])  # class 1 missing in episode 1
    with pytest.raises(ValueError, match="every class present in every episode"):
        make(name, context).fit(torch.stack([support, support]), labels)


@pytest.mark.parametrize("name", NAMES)
def test_get_params_round_trips_through_create_method(name: str, context: MethodContext) -> None:
    params = make(name, context).get_params()
    assert list(params) == METHODS[name].hyperparameter_names()
    assert create_method(name, context, **params).get_params() == params


# --- hand-computed checks -----------------------------------------------------------------------


def test_protonet_is_negative_squared_distance_to_class_means(context: MethodContext) -> None:
    support, labels, query, _ = task("protonet", n_way=4, k_shot=3)
    means = torch.stack([support[labels == c].mean(dim=0) for c in range(4)])
    expected = -((query[:, None, :] - means[None]) ** 2).sum(dim=2)
    logits = create_method("protonet", context).fit(support, labels).predict_logits(query)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-3)


def test_simpleshot_is_the_cl2n_nearest_centroid_rule(context: MethodContext) -> None:
    support, labels, query, _ = task("simpleshot", n_way=4, k_shot=3)
    method = create_method("simpleshot", context, temperature=0.5).fit(support, labels)
    mean = context.base_feature_mean
    assert mean is not None

    def cl2n(x: Tensor) -> Tensor:
        return (x - mean) / (x - mean).norm(dim=1, keepdim=True)

    centroids = torch.stack([cl2n(support)[labels == c].mean(dim=0) for c in range(4)])
    distances = ((cl2n(query)[:, None] - centroids[None]) ** 2).sum(dim=2).sqrt()
    torch.testing.assert_close(method.predict_logits(query), -distances / 0.5, rtol=1e-4, atol=1e-4)


def test_simpleshot_checks_the_base_mean_dimension() -> None:
    support, labels = task("simpleshot")[:2]
    method = create_method("simpleshot", MethodContext(base_feature_mean=torch.zeros(DIM + 1)))
    with pytest.raises(ValueError, match="base_feature_mean has shape"):
        method.fit(support, labels)


@pytest.mark.parametrize("k_shot", [1, 5])
def test_r2d2_dual_solution_equals_the_primal_ridge(k_shot: int, context: MethodContext) -> None:
    support, labels, query, _ = task("r2d2", n_way=4, k_shot=k_shot)
    lam, scale = 0.3, 7.0
    x = F.normalize(support.double(), dim=1)
    targets = F.one_hot(labels, 4).double()
    weights = torch.linalg.solve(x.T @ x + lam * torch.eye(DIM, dtype=torch.float64), x.T @ targets)
    expected = scale * F.normalize(query.double(), dim=1) @ weights
    logits = create_method("r2d2", context, lam=lam, scale=scale).fit(support, labels).predict_logits(query)
    torch.testing.assert_close(logits, expected.float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("n_way", [2, 4])
def test_logreg_matches_scikit_learn(n_way: int, context: MethodContext) -> None:
    support, labels, query, _ = task("logreg", n_way=n_way, k_shot=3)
    logits = create_method("logreg", context, C=2.0).fit(support, labels).predict_logits(query)
    model = LogisticRegression(C=2.0, solver="newton-cg", tol=1e-12)  # near-exact, like our Newton solve
    model.fit(F.normalize(support.double(), dim=1).numpy(), labels.numpy())
    normalised_query = F.normalize(query.double(), dim=1).numpy()
    np.testing.assert_allclose(torch.softmax(logits, dim=1), model.predict_proba(normalised_query), atol=1e-6)
    np.testing.assert_array_equal(logits.argmax(dim=1), model.predict(normalised_query))


def test_anil_equals_gradient_descent_with_autograd(context: MethodContext) -> None:
    support, labels, query, _ = task("anil", n_way=3, k_shot=2)
    head = nn.Linear(DIM, 3)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    optimizer = torch.optim.SGD(head.parameters(), lr=0.05)
    for _ in range(4):
        optimizer.zero_grad()
        F.cross_entropy(head(support), labels).backward()
        optimizer.step()
    logits = create_method("anil", context, steps=4, lr=0.05).fit(support, labels).predict_logits(query)
    torch.testing.assert_close(logits, head(query).detach(), rtol=1e-4, atol=1e-5)


# --- fine-tuning --------------------------------------------------------------------------------


def _weights(module: nn.Module) -> dict[str, Tensor]:
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


def _changed(before: dict[str, Tensor], module: nn.Module) -> set[str]:
    """Names of parameters that differ from ``before``."""
    return {name for name, value in module.named_parameters() if not torch.equal(value, before[name])}


@pytest.mark.parametrize("mode", ["head", "last_block", "full"])
def test_finetune_trains_only_what_mode_unfreezes(mode: str, context: MethodContext) -> None:
    assert context.backbone is not None
    before = _weights(context.backbone)
    support, labels = task("finetune", k_shot=2)[:2]
    method = create_method("finetune", context, mode=mode, steps=3, lr=1e-2, backbone_lr=1e-2).fit(
        support, labels
    )
    # the context backbone is untouched, weights, statistics and mode alike
    assert all(torch.equal(v, before[k]) for k, v in context.backbone.state_dict().items())
    assert not context.backbone.training
    changed = _changed(before, method.backbone_)
    names = {name for name, _ in method.backbone_.named_parameters()}
    if mode == "head":
        assert not changed
        assert all(torch.equal(v, before[k]) for k, v in method.backbone_.state_dict().items())
    elif mode == "last_block":
        assert changed and all(name.startswith("layer4.") for name in changed)
    else:
        assert any(name.startswith("conv1.") for name in changed)
        assert len(changed) > len(names) // 2
    assert not method.backbone_.training


def test_finetune_without_train_bn_keeps_the_batchnorm_statistics(context: MethodContext) -> None:
    assert context.backbone is not None
    support, labels = task("finetune", k_shot=2)[:2]
    method = create_method("finetune", context, mode="full", steps=2, train_bn=False).fit(support, labels)
    stats = {name: value for name, value in context.backbone.state_dict().items() if "running" in name}
    assert stats and all(torch.equal(method.backbone_.state_dict()[name], v) for name, v in stats.items())
    assert _changed(_weights(context.backbone), method.backbone_)


def test_finetune_head_is_imprinted_from_prototypes(context: MethodContext) -> None:
    assert context.backbone is not None
    support, labels, query, _ = task("finetune", k_shot=2)
    method = create_method("finetune", context, steps=1, lr=1e-12, augment=False).fit(support, labels)
    with torch.no_grad():
        features = F.normalize(context.backbone(support), dim=1)
        prototypes = F.normalize(torch.stack([features[labels == c].mean(dim=0) for c in range(3)]), dim=1)
        expected = 10.0 * F.normalize(context.backbone(query), dim=1) @ prototypes.T
    torch.testing.assert_close(method.predict_logits(query), expected, rtol=1e-4, atol=1e-4)


def test_finetune_runs_under_inference_mode(context: MethodContext) -> None:
    support, labels, query, _ = task("finetune", k_shot=1, n_query=2)
    with torch.inference_mode():
        method = create_method("finetune", context, mode="full", steps=2).fit(support, labels)
        logits = method.predict_logits(query)
    assert logits.shape == (6, 3) and torch.isfinite(logits).all()


def test_finetune_seed_comes_from_the_context(context: MethodContext) -> None:
    assert create_method("finetune", context).random_state == context.seed
    assert create_method("finetune", context, random_state=7).random_state == 7
    support, labels, query, _ = task("finetune", k_shot=2)
    first = create_method("finetune", context, steps=2, random_state=1).fit(support, labels)
    second = create_method("finetune", context, steps=2, random_state=2).fit(support, labels)
    assert not torch.equal(first.predict_logits(query), second.predict_logits(query))


def test_last_stage_of_timm_and_plain_modules() -> None:
    assert last_stage(create_backbone("resnet10t", image_size=IMAGE_SIZE)) == "layer4"
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 2), nn.ReLU())
    assert last_stage(plain) == "2"


# --- registry and factory -------------------------------------------------------------------------


def test_registry_holds_the_planned_methods() -> None:
    assert {"simpleshot", "protonet", "logreg", "r2d2", "anil", "finetune"} <= set(METHODS)
    assert all(METHODS[name].name == name for name in METHODS)


def test_unknown_method_lists_the_known_ones(context: MethodContext) -> None:
    with pytest.raises(ConfigError, match="unknown few-shot method 'protonett'") as error:
        create_method("protonett", context)
    assert all(name in str(error.value) for name in METHODS)
    assert str(error.value).endswith("; did you mean 'protonet'?") and "\n" not in str(error.value)


def test_unknown_parameter_is_named_with_the_allowed_ones(context: MethodContext) -> None:
    message = (
        r"method 'r2d2' has no parameter lamda; its parameters: features, lam, scale; did you mean 'lam'\?"
    )
    with pytest.raises(ConfigError, match=message):
        create_method("r2d2", context, lamda=0.1)
    with pytest.raises(ConfigError, match="its parameters: none"):
        create_method("protonet", context, scale=2)


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("r2d2", {"lam": -1.0}, "lam must be a positive number"),
        ("logreg", {"max_iter": 1.5}, "max_iter must be a positive integer"),
        ("simpleshot", {"temperature": "warm"}, "temperature must be a positive number"),
        ("anil", {"steps": True}, "steps must be a positive integer"),
        ("finetune", {"mode": "partial"}, "mode must be one of head, last_block, full"),
        ("finetune", {"augment": "yes"}, "augment must be true or false"),
        ("finetune", {"train_bn": 1}, "train_bn must be true or false"),
        ("finetune", {"random_state": 0.5}, "random_state must be an integer"),
    ],
)
def test_invalid_parameter_values(name: str, params: dict, message: str, context: MethodContext) -> None:
    with pytest.raises(ConfigError, match=f"method '{name}': {message}"):
        create_method(name, context, **params)
    with pytest.raises(ConfigError, match=f"method '{name}': {message}"):
        METHODS[name].validate_params(params)


@pytest.mark.parametrize("name", NAMES)
def test_config_params_validate_without_a_context(name: str) -> None:
    METHODS[name].validate_params({})
    METHODS[name].validate_params(FAST_PARAMS.get(name, {}))


def test_a_misspelt_parameter_gets_a_suggestion() -> None:
    message = r"method 'finetune' has no parameter stepz; .* did you mean 'steps'\?"
    with pytest.raises(ConfigError, match=message):
        METHODS["finetune"].validate_params({"stepz": 3})
    with pytest.raises(ConfigError, match=r"mode must be one of .*, got 'ful'; did you mean 'full'\?"):
        METHODS["finetune"].validate_params({"mode": "ful"})


def test_context_needs_are_checked_when_the_method_is_built() -> None:
    METHODS["laplace_logreg"].validate_params({"features": "centred"})  # the run supplies the mean
    with pytest.raises(ConfigError, match="method 'laplace_logreg': features 'centred' needs the base-class"):
        create_method("laplace_logreg", MethodContext(), features="centred")


@pytest.mark.parametrize(("name", "missing"), [("simpleshot", "base_feature_mean"), ("finetune", "backbone")])
def test_missing_context_is_a_config_error(name: str, missing: str) -> None:
    with pytest.raises(ConfigError, match=f"method '{name}' needs the pipeline to provide {missing}"):
        create_method(name, MethodContext())


def test_register_method_refuses_a_taken_name() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_method("protonet")(METHODS["protonet"])
