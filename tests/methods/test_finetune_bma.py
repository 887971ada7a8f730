"""Bayesian model averaging of fine-tuning over a downstream SWAG posterior (``bma_samples``)."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch import Tensor, nn

from fewshot_med.errors import ConfigError
from fewshot_med.methods import MethodContext, create_method
from fewshot_med.methods.finetune import FineTune
from fewshot_med.models import create_backbone

IMAGE_SIZE = 16
#: Fast, deterministic fine-tuning of the last stage (no augmentation), with a 3-snapshot posterior.
FAST = {"mode": "last_block", "steps": 5, "lr": 1e-2, "backbone_lr": 1e-2, "augment": False}
BMA = {"bma_samples": 4, "bma_snapshots": 3}


@pytest.fixture(scope="module")
def context() -> MethodContext:
    torch.manual_seed(0)
    return MethodContext(backbone=create_backbone("resnet10t", image_size=IMAGE_SIZE).eval())


def fit(context: MethodContext, support: tuple[Tensor, Tensor, Tensor], **params: object):
    images, labels, _ = support
    return create_method("finetune", context, **{**FAST, **params}).fit(images, labels)


def map_logits(method, query: Tensor) -> Tensor:
    """Logits of the fitted (MAP) weights ``backbone_`` and ``head_``."""
    with torch.inference_mode():
        return method._logits(method.backbone_, method.head_, query)


def test_no_samples_scores_exactly_as_without_the_bma_parameters(context, support) -> None:
    query = support[2]
    plain = fit(context, support, augment=True)
    off = fit(context, support, augment=True, bma_samples=0, bma_snapshots=3, bma_scale=0.5)
    assert torch.equal(plain.predict_logits(query), off.predict_logits(query))
    assert off.bma_posterior_ is None


def test_collecting_the_posterior_leaves_training_unchanged(context, support) -> None:
    query = support[2]
    plain = fit(context, support, augment=True)
    averaged = fit(context, support, augment=True, **BMA)
    assert torch.equal(map_logits(averaged, query), plain.predict_logits(query))


def test_bma_returns_log_probabilities_that_differ_from_the_map_ones(context, support) -> None:
    query = support[2]
    method = fit(context, support, **BMA)
    log_probs = method.predict_logits(query)
    assert log_probs.shape == (len(query), 3) and log_probs.dtype == torch.float32
    assert torch.isfinite(log_probs).all()
    torch.testing.assert_close(log_probs.logsumexp(dim=1), torch.zeros(len(query)), atol=1e-5, rtol=0)
    # the weights moved during the snapshotted steps, so the samples differ from the MAP weights
    assert not torch.allclose(log_probs, map_logits(method, query).log_softmax(dim=1), atol=1e-3)


def test_bma_is_reproducible_and_seeded_by_random_state(context, support) -> None:
    query = support[2]
    first = fit(context, support, random_state=3, **BMA).predict_logits(query)
    again = fit(context, support, random_state=3, **BMA).predict_logits(query)
    other = fit(context, support, random_state=4, **BMA).predict_logits(query)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)  # without augmentation, only the sampling depends on the seed


def test_weights_that_do_not_move_give_the_map_probabilities(context, support) -> None:
    query = support[2]
    # steps of 1e-12 are lost in float32 rounding: every snapshot is the same, the variance is at the
    # floor and every sample is the mean, the MAP weights
    method = fit(context, support, lr=1e-12, backbone_lr=1e-12, bma_scale=1.0, **BMA)
    expected = map_logits(method, query).log_softmax(dim=1)
    torch.testing.assert_close(method.predict_logits(query), expected, atol=1e-5, rtol=1e-5)


def test_scoring_restores_the_map_weights(context, support) -> None:
    query = support[2]
    method = fit(context, support, **BMA)
    before_logits = map_logits(method, query)
    before = {
        name: p.clone()
        for module in (method.backbone_, method.head_)
        for name, p in module.state_dict().items()
    }
    first = method.predict_logits(query)
    after = {
        name: p for module in (method.backbone_, method.head_) for name, p in module.state_dict().items()
    }
    assert before.keys() == after.keys() and all(torch.equal(before[name], after[name]) for name in before)
    assert torch.equal(map_logits(method, query), before_logits)
    assert torch.equal(method.predict_logits(query), first)


def test_bma_chunks_and_pickles(context, support) -> None:
    query = support[2]
    method = fit(context, support, **BMA)
    whole = method.predict_logits(query)
    method.batch_size = 4  # chunks of 4 and 2 queries
    torch.testing.assert_close(method.predict_logits(query), whole, atol=1e-6, rtol=1e-6)
    restored = pickle.loads(pickle.dumps(method))
    assert restored.bma_posterior_ is not None
    assert torch.equal(restored.predict_logits(query), method.predict_logits(query))


@pytest.mark.parametrize("mode", ["head", "last_block"])
def test_the_posterior_covers_exactly_the_trainable_parameters(mode: str, context, support) -> None:
    method = fit(context, support, mode=mode, **BMA)
    posterior = method.bma_posterior_
    stage = [name for name, _ in context.backbone.named_parameters() if name.startswith("layer4.")]
    assert stage  # resnet10t's last stage
    backbone = [f"backbone.{name}" for name in stage] if mode == "last_block" else []
    assert list(posterior.names) == [*backbone, "head.weight", "head.bias"]
    assert posterior.n_snapshots == 3 and posterior.rank == 3
    assert posterior.unflatten(posterior.mean)["head.weight"].shape == (3, context.backbone.num_features)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"bma_samples": -1}, "bma_samples must be an integer ≥ 0, got -1"),
        ({"bma_samples": 2.5}, "bma_samples must be an integer ≥ 0, got 2.5"),
        ({"bma_samples": 2, "bma_snapshots": 1}, "bma_snapshots must be an integer ≥ 2, got 1"),
        ({"bma_samples": 2, "bma_snapshots": 6}, r"bma_snapshots must be at most steps \(5\)"),
        ({"bma_samples": 2, "bma_scale": 0.0}, "bma_scale must be a positive number, got 0.0"),
    ],
)
def test_invalid_bma_parameters(params: dict, message: str, context, support) -> None:
    with pytest.raises(ConfigError, match=f"method 'finetune': {message}"):
        create_method("finetune", context, **{**FAST, "bma_snapshots": 3, **params})
    method = create_method(
        "finetune", context, **FAST, bma_snapshots=3
    )  # valid here, set afterwards: fit checks
    for name, value in params.items():
        setattr(method, name, value)
    with pytest.raises(ValueError, match=message):
        method.fit(*support[:2])


def test_more_snapshots_than_steps_is_fine_without_bma(context) -> None:
    assert create_method("finetune", context, steps=3).bma_snapshots == 10


def test_the_rank_is_capped_at_20(context, support) -> None:
    method = fit(context, support, mode="head", steps=22, bma_samples=1, bma_snapshots=22)
    assert method.bma_posterior_.n_snapshots == 22 and method.bma_posterior_.rank == 20


def test_bma_on_a_method_fitted_without_it_is_refused(context, support) -> None:
    method = fit(context, support, steps=1)
    method.bma_samples = 2
    with pytest.raises(ValueError, match="fitted with bma_samples=0"):
        method.predict_logits(support[2])


def test_layers_stay_in_eval_mode(context, support) -> None:
    method = fit(context, support, mode="full", train_bn=True, **BMA)
    method.predict_logits(support[2])
    assert not any(module.training for module in method.backbone_.modules())
    assert isinstance(method.head_, nn.Linear)


def test_a_method_pickled_before_bma_and_the_optimizer_existed_scores_as_before(context, support):
    method = fit(context, support)
    expected = method.predict_logits(support[2])
    state = method.__getstate__()
    for name in ("bma_samples", "bma_snapshots", "bma_scale", "bma_posterior_", "optimizer"):
        state.pop(name)  # what an earlier version pickled
    restored = FineTune.__new__(FineTune)
    restored.__setstate__(pickle.loads(pickle.dumps(state)))
    assert torch.equal(restored.predict_logits(support[2]), expected)
