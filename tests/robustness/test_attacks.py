"""White-box attacks on adapted few-shot pipelines: the adapted module, PGD against ART, the checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from art.attacks.evasion import ProjectedGradientDescentPyTorch
from art.estimators.classification import PyTorchClassifier
from torch import nn

from fewshot_med.data import sample_episodes, select_classes
from fewshot_med.data.demo import DEMO_NOVEL_CLASSES, make_demo_dataset
from fewshot_med.methods import MethodContext, create_method
from fewshot_med.models import BackboneSpec, create_backbone, embed
from fewshot_med.robustness.adapted import (
    ATTACKABLE,
    SUPPORT_ATTACKABLE,
    FeatureModel,
    SupportAttackModel,
    adapt,
    unit_images,
)
from fewshot_med.robustness.attacks import fgsm, pgd
from fewshot_med.robustness.evaluate import (
    RobustnessSettings,
    attack_queries,
    attack_support,
    episode_positions,
    masking_check,
)

CPU = torch.device("cpu")
SIZE = 16
#: not the identity, so an attack placed after normalisation would break the pixel budget
SPEC = BackboneSpec("resnet10t", 3, SIZE, mean=(0.6, 0.5, 0.4), std=(0.2, 0.25, 0.1))


@pytest.fixture(scope="module")
def setup():
    """A random-init resnet10t, the demo novel test pool in [0, 1], its embeddings, 3 episodes per K
    (one torch thread: on a shared CPU, more make these small batches ten times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    dataset = make_demo_dataset(image_size=SIZE, images_per_common_class=40, images_per_rare_class=40)
    pool = select_classes(dataset, "test", DEMO_NOVEL_CLASSES)
    backbone = create_backbone(SPEC.name, SPEC.in_chans, SIZE).eval()
    features = embed(backbone, pool.images, SPEC, CPU)
    episodes = {k: sample_episodes(pool, 3, k, 3, 3, seed=0) for k in (1, 3)}
    context = MethodContext(base_feature_mean=features.mean(dim=0), backbone=backbone, spec=SPEC)
    yield FeatureModel(backbone, SPEC), unit_images(pool.images), features, pool, episodes, context
    torch.set_num_threads(threads)


def _factory(name: str, context: MethodContext):
    return lambda: create_method(name, context)


@pytest.mark.parametrize("method", ATTACKABLE)
def test_adapted_module_gives_the_methods_own_logits(setup, method):
    model_features, images, features, pool, episodes, context = setup
    support, query = episode_positions(pool, episodes[3])
    labels = torch.as_tensor(episodes[3].arrays.support_labels[0])
    fitted = create_method(method, context).fit(features[support[0]], labels)
    model = adapt(_factory(method, context), model_features, features[support[0]], labels)
    with torch.no_grad():
        logits = model(images[query[0]])
    torch.testing.assert_close(logits, fitted.predict_logits(features[query[0]]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ATTACKABLE)
def test_a_model_adapted_on_several_episodes_scores_each_query_with_its_episodes_head(setup, method):
    model_features, images, features, pool, episodes, context = setup
    support, query = episode_positions(pool, episodes[3])
    labels = torch.as_tensor(episodes[3].arrays.support_labels)
    batched = adapt(_factory(method, context), model_features, features[support], labels)
    with torch.no_grad():
        logits = batched(images[query.reshape(-1)]).view(len(query), query.shape[1], -1)
        for e in range(len(query)):
            alone = adapt(_factory(method, context), model_features, features[support[e]], labels[e])
            torch.testing.assert_close(logits[e], alone(images[query[e]]), atol=1e-5, rtol=1e-5)


def test_one_attack_on_several_episodes_equals_one_attack_per_episode(setup):
    """FGSM has no random start: the batched attack must move every image exactly as its own episode's
    attack does (eval-mode features do not depend on the batch)."""
    model_features, images, features, pool, episodes, context = setup
    support, query = episode_positions(pool, episodes[3])
    labels = torch.as_tensor(episodes[3].arrays.support_labels)
    targets = torch.as_tensor(episodes[3].arrays.query_labels)
    batched = adapt(_factory("protonet", context), model_features, features[support], labels)
    together = fgsm(batched, images[query.reshape(-1)], targets.reshape(-1), 4 / 255).reshape(
        *query.shape, -1
    )
    for e in range(len(query)):
        alone = adapt(_factory("protonet", context), model_features, features[support[e]], labels[e])
        by_episode = fgsm(alone, images[query[e]], targets[e], 4 / 255)
        torch.testing.assert_close(together[e], by_episode.flatten(1), atol=1e-6, rtol=0)


def _small_model() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)
    )


def test_pgd_stays_in_the_ball_and_the_unit_cube_and_restores_the_model():
    model, images = _small_model().train(), torch.rand(6, 3, 8, 8)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    model(images).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    adversarial = pgd(model, images, labels, 4 / 255, steps=5, seed=0)
    assert adversarial.shape == images.shape and adversarial.dtype == images.dtype
    assert (adversarial - images).abs().max() <= 4 / 255 + 1e-6
    assert adversarial.min() >= 0 and adversarial.max() <= 1
    assert not torch.equal(adversarial, images)
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads, strict=True))
    torch.testing.assert_close(pgd(model, images, labels, 4 / 255, steps=5, seed=0), adversarial)
    fast = fgsm(model, images, labels, 4 / 255)
    assert (fast - images).abs().max() <= 4 / 255 + 1e-6 and fast.min() >= 0 and fast.max() <= 1


def test_pgd_equals_arts_attack_called_directly():
    model, images = _small_model().eval(), torch.rand(6, 3, 8, 8)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    ours = pgd(model, images, labels, 8 / 255, steps=7, step_size=1 / 255, random_start=False)
    classifier = PyTorchClassifier(
        model, nn.CrossEntropyLoss(), (3, 8, 8), 3, clip_values=(0.0, 1.0), device_type="cpu"
    )
    attack = ProjectedGradientDescentPyTorch(
        classifier, eps=8 / 255, eps_step=1 / 255, max_iter=7, num_random_init=0, verbose=False
    )
    theirs = attack.generate(images.numpy(), labels.numpy())
    np.testing.assert_allclose(ours.numpy(), theirs, atol=1e-6)
    # PGD raises the loss it maximises
    loss = nn.functional.cross_entropy
    with torch.no_grad():
        assert loss(model(ours), labels) > loss(model(images), labels)


@pytest.mark.parametrize("method", ["protonet", "logreg"])
def test_robust_accuracy_never_exceeds_clean_and_collapses_at_a_huge_budget(setup, method):
    _, images, _, pool, episodes, _ = setup
    # a linear feature map: a random-init resnet maps every attacked image to one class, whose own
    # queries then stay correct, which is no test of the attack
    torch.manual_seed(0)
    linear = FeatureModel(nn.Sequential(nn.Flatten(), nn.Linear(3 * SIZE * SIZE, 16)), SPEC)
    with torch.no_grad():
        features = linear(images)
    context = MethodContext(base_feature_mean=features.mean(dim=0))
    settings = RobustnessSettings(
        epsilons=(2 / 255,), steps=(3, 6), check_epsilon=1.0, episodes=3, queries_per_class=2
    )
    results = attack_queries(
        _factory(method, context), method, linear, images, features, pool, episodes[3], settings
    )
    clean, *attacked = results
    assert clean.name == "clean" and clean.probs.shape == (3, 6, 3)
    assert clean.accuracy().mean() > 0  # something to lose
    for result in attacked:
        assert (result.accuracy() <= clean.accuracy()).all(), result.name
        value, half = result.summary()["ece_pooled"]
        assert 0 <= value <= 1 and half >= 0
    check = masking_check(results, settings)
    assert check.collapse[0] == 0.0 and check.passed
    assert [round(eps * 255) for eps, _, _ in check.steps_gap] == [2]


def test_support_attack_backpropagates_through_the_fit(setup):
    model_features, images, features, pool, episodes, context = setup
    support, query = episode_positions(pool, episodes[1])
    labels = torch.as_tensor(episodes[1].arrays.support_labels[0])
    for method in SUPPORT_ATTACKABLE:
        model = SupportAttackModel(
            _factory(method, context), model_features, features[support[0]], labels, 0, features[query[0, 0]]
        )
        image = images[support[0, 0]].unsqueeze(0).requires_grad_(True)
        model(image)[0, 0].backward()
        assert image.grad is not None and image.grad.abs().sum() > 0, method


@pytest.mark.parametrize("method", SUPPORT_ATTACKABLE)
def test_support_attacks_of_several_episodes_run_as_one_batch_of_independent_rows(setup, method):
    """Row r of the batched model is support set r with its own replaced sample and target: its logits
    and its image's gradient are those of the one-attack model."""
    model_features, images, features, pool, episodes, context = setup
    support, query = episode_positions(pool, episodes[3])
    labels = torch.as_tensor(episodes[3].arrays.support_labels)
    index, column = torch.tensor([0, 4, 8]), torch.tensor([0, 3, 7])
    rows = torch.arange(3)
    batched = SupportAttackModel(
        _factory(method, context),
        model_features,
        features[support],
        labels,
        index,
        features[query[rows, column]],
    )
    image = images[support[rows, index]].clone().requires_grad_(True)
    logits = batched(image)
    logits[rows, 0].sum().backward()
    for r in range(3):
        alone = SupportAttackModel(
            _factory(method, context),
            model_features,
            features[support[r]],
            labels[r],
            int(index[r]),
            features[query[r, column[r]]],
        )
        one = images[support[r, index[r]]].unsqueeze(0).requires_grad_(True)
        single = alone(one)
        single[0, 0].backward()
        torch.testing.assert_close(logits[r], single[0].detach(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(image.grad[r], one.grad[0], atol=1e-5, rtol=1e-4)


def test_support_attack_flips_queries_at_a_huge_budget(setup):
    model_features, images, features, pool, episodes, context = setup
    settings = RobustnessSettings(epsilons=(1 / 255, 255 / 255), steps=(3,), episodes=3, support_targets=2)
    small, huge = attack_support(
        _factory("protonet", context),
        "protonet",
        model_features,
        images,
        features,
        pool,
        episodes[1],
        settings,
    )
    assert small.summary()[0] <= huge.summary()[0]
    assert huge.summary()[0] > 0.5  # 1-shot: the attacked image is its class's prototype
