import copy
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch.func import functional_call

from fewshot_med.config import MetaTrainConfig
from fewshot_med.data import sample_episodes, select_classes
from fewshot_med.data.demo import DEMO_BASE_CLASSES, DEMO_NOVEL_CLASSES, make_demo_dataset
from fewshot_med.data.transforms import channel_stats, to_model_input
from fewshot_med.errors import FewshotMedError
from fewshot_med.methods.anil import ANIL, fit_linear_head, head_logits
from fewshot_med.methods.protonet import ProtoNet
from fewshot_med.models import BackboneSpec, create_backbone, load_checkpoint
from fewshot_med.training.meta import (
    ALGORITHMS,
    EpisodeBatch,
    anil_step,
    fomaml_adapt,
    fomaml_step,
    meta_train,
    protonet_step,
)

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def pools():
    """16 px demo data: base classes of train and val (learning signal), novel classes of val."""
    dataset = make_demo_dataset(image_size=16, images_per_common_class=80, images_per_rare_class=40)
    train = select_classes(dataset, "train", DEMO_BASE_CLASSES)
    mean, std = channel_stats(train.images)
    spec = BackboneSpec("resnet10t", 3, 16, mean, std)
    base_val = select_classes(dataset, "val", DEMO_BASE_CLASSES)
    novel_val = select_classes(dataset, "val", DEMO_NOVEL_CLASSES)
    return spec, train, base_val, novel_val


def _backbone() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_backbone("resnet10t", image_size=16)


def _batch(pools, n_way: int = 3, k_shot: int = 2, n_query: int = 2) -> EpisodeBatch:
    spec, train, _, _ = pools
    episode = sample_episodes(train, n_way, k_shot, n_query, 1, seed=0).episodes[0]
    position = {int(row): i for i, row in enumerate(train.indices)}
    rows = [position[int(r)] for r in np.concatenate([episode.support_rows(), episode.query_rows()])]
    labels = np.concatenate([episode.support_labels(), episode.query_labels()])
    return EpisodeBatch(
        images=to_model_input(train.images[rows], spec.mean, spec.std, spec.in_chans, CPU),
        labels=torch.from_numpy(labels),
        n_support=n_way * k_shot,
        n_way=n_way,
    )


def test_the_config_selects_from_the_registry():
    assert set(ALGORITHMS) == {"protonet", "anil", "fomaml"}
    assert all(MetaTrainConfig(algorithm=name).algorithm == name for name in ALGORITHMS)
    with pytest.raises(ValidationError, match="meta-training algorithm"):
        MetaTrainConfig(algorithm="maml")


@pytest.mark.parametrize(
    ("step", "method"),
    [(protonet_step, ProtoNet()), (anil_step, ANIL(steps=2, lr=0.1))],
    ids=["protonet", "anil"],
)
def test_episode_steps_differentiate_the_methods_own_maths(pools, step, method):
    backbone = _backbone().eval()  # running statistics: the features do not depend on the batch
    batch = _batch(pools)
    loss, accuracy = step(backbone, batch, MetaTrainConfig(inner_steps=2, inner_lr=0.1))
    with torch.no_grad():
        features = backbone(batch.images)
    logits = method.fit(features[: batch.n_support], batch.support_labels).predict_logits(
        features[batch.n_support :]
    )
    torch.testing.assert_close(loss, F.cross_entropy(logits, batch.query_labels), rtol=1e-6, atol=1e-6)
    assert accuracy == (logits.argmax(dim=1) == batch.query_labels).float().mean()
    assert all(p.grad is not None for p in backbone.parameters())


def test_anil_inner_loop_is_differentiable_in_the_support_features():
    torch.manual_seed(0)
    labels = torch.tensor([[0, 0, 1, 1]])
    query = torch.randn(1, 3, 4, dtype=torch.float64)

    def query_loss(support: torch.Tensor) -> torch.Tensor:
        weight, bias = fit_linear_head(support, labels, 2, steps=3, lr=0.5)
        return F.cross_entropy(head_logits(query, weight, bias)[0], torch.tensor([0, 1, 1]))

    support = torch.randn(1, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(query_loss, (support,))  # second order through the head steps
    assert torch.autograd.grad(query_loss(support), support)[0].abs().sum() > 0


def test_anil_step_backpropagates_through_the_adapted_head(pools):
    backbone = _backbone().eval()  # running statistics: support and query are not coupled by batch-norm
    batch = _batch(pools)
    images = batch.images.clone().requires_grad_()
    settings = MetaTrainConfig(algorithm="anil", inner_steps=2, inner_lr=0.1)
    loss, accuracy = anil_step(backbone, EpisodeBatch(images, batch.labels, batch.n_support, 3), settings)
    assert math.isfinite(loss.item()) and 0 <= accuracy.item() <= 1
    # support images reach the query loss only through the inner loop
    assert images.grad[: batch.n_support].abs().sum() > 0
    grads = [p.grad for p in backbone.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0


def test_fomaml_adaptation_leaves_no_graph_and_no_trace_on_the_backbone(pools):
    backbone = _backbone().train()
    before = copy.deepcopy(backbone.state_dict())
    batch = _batch(pools)
    fast, weight, bias = fomaml_adapt(backbone, batch.support, batch.support_labels, 3, steps=2, lr=0.1)
    assert set(fast) == {name for name, _ in backbone.named_parameters()}
    for tensor in [*fast.values(), weight, bias]:
        assert tensor.is_leaf and tensor.grad_fn is None and tensor.grad is None
    assert weight.abs().sum() > 0
    assert any(not torch.equal(fast[name], before[name]) for name in fast)
    after = backbone.state_dict()
    assert all(torch.equal(after[key], value) for key, value in before.items())  # buffers too


def test_fomaml_step_sets_the_query_gradient_at_the_adapted_weights(pools):
    backbone = _backbone().train()
    twin = copy.deepcopy(backbone)
    before = copy.deepcopy(backbone.state_dict())
    batch = _batch(pools)
    settings = MetaTrainConfig(algorithm="fomaml", inner_steps=2, inner_lr=0.1)
    fomaml_step(backbone, batch, settings)

    for name, param in backbone.named_parameters():
        assert torch.equal(param, before[name])  # only the outer optimizer moves the weights
    tracked = [k for k in before if k.endswith("num_batches_tracked")]
    assert all(backbone.state_dict()[k] == before[k] + 1 for k in tracked)  # the query pass only

    fast, weight, bias = fomaml_adapt(twin, batch.support, batch.support_labels, 3, 2, 0.1)
    loss = F.cross_entropy(
        F.linear(functional_call(twin, fast, (batch.query,)), weight, bias), batch.query_labels
    )
    expected = torch.autograd.grad(loss, list(fast.values()))
    for (name, param), grad in zip(backbone.named_parameters(), expected, strict=True):
        assert torch.allclose(param.grad, grad, atol=1e-6), name


# measured with seeds 0-2 (1 and 2 CPU threads): val accuracy on the 5 base classes (chance 0.2)
# rises from 0.30-0.33 to 0.42-0.45 (protonet), 0.44-0.48 (anil), 0.40-0.43 (fomaml); CI half-width
# about 0.024, and the episodes are the same at every validation
@pytest.mark.parametrize(
    ("algorithm", "episodes", "inner_steps", "lr"),
    [("protonet", 30, 5, 1e-3), ("anil", 30, 5, 1e-3), ("fomaml", 20, 3, 3e-3)],
)
def test_meta_train_learns(pools, algorithm, episodes, inner_steps, lr):
    spec, train, base_val, _ = pools
    settings = MetaTrainConfig(
        algorithm=algorithm,
        episodes=episodes,
        k_shot=2,
        n_query=3,
        lr=lr,
        inner_steps=inner_steps,
        augment=False,
        val_every=episodes // 2,
    )
    logged = []
    result = meta_train(
        _backbone(), spec, train, base_val, settings, CPU, log_metrics=lambda m, s: logged.append((s, m))
    )
    history = result.history
    assert [record["episode"] for record in history] == [0, episodes // 2, episodes]
    assert all(math.isfinite(record["train_loss"]) for record in history[1:])
    assert history[2]["train_loss"] < history[1]["train_loss"]
    assert result.best_val_accuracy >= history[0]["val_accuracy"] + 0.05
    assert result.best_val_accuracy == max(record["val_accuracy"] for record in history)
    assert not result.backbone.training
    assert [step for step, _ in logged] == [0, episodes // 2, episodes]
    assert {"train_loss", "val_accuracy", "val_accuracy_ci95"} <= set(logged[1][1])
    assert ("val_adapted_accuracy" in logged[0][1]) == (algorithm == "anil")


class _Interrupted(Exception):
    pass


def _interrupt_at(episode: int):
    def log(metrics: dict[str, float], step: int) -> None:
        if step == episode:
            raise _Interrupted

    return log


@pytest.mark.parametrize("algorithm", ["protonet", "fomaml"])
def test_resume_reproduces_the_uninterrupted_weights(pools, tmp_path, algorithm):
    spec, train, _, novel_val = pools
    settings = MetaTrainConfig(
        algorithm=algorithm, episodes=4, n_way=3, k_shot=1, n_query=2, inner_steps=1, val_every=2
    )
    whole, parts = tmp_path / "whole.pt", tmp_path / "parts.pt"
    meta_train(_backbone(), spec, train, novel_val, settings, CPU, checkpoint_path=whole, seed=1)
    with pytest.raises(_Interrupted):
        meta_train(
            _backbone(), spec, train, novel_val, settings, CPU, parts, log_metrics=_interrupt_at(2), seed=1
        )
    assert load_checkpoint(parts)["episode"] == 2
    resumed = meta_train(_backbone(), spec, train, novel_val, settings, CPU, parts, resume=True, seed=1)

    expected, got = load_checkpoint(whole), load_checkpoint(parts)
    assert got["episode"] == 4
    for key, value in expected["current"]["backbone"].items():
        assert torch.equal(got["current"]["backbone"][key], value), key

    def without_timing(history: list[dict[str, float]]) -> list[dict[str, float]]:
        return [{k: v for k, v in record.items() if k != "seconds_per_episode"} for record in history]

    assert without_timing(got["history"]) == without_timing(expected["history"])
    assert resumed.best_episode == expected["best_episode"]

    again = meta_train(_backbone(), spec, train, novel_val, settings, CPU, parts, resume=True, seed=1)
    assert len(again.history) == 3  # a finished run is returned as is
    with pytest.raises(FewshotMedError, match="lr"):
        changed = settings.model_copy(update={"lr": 1e-3})
        meta_train(_backbone(), spec, train, novel_val, changed, CPU, parts, resume=True, seed=1)


def test_refuses_more_ways_than_base_classes(pools):
    spec, train, _, novel_val = pools
    with pytest.raises(FewshotMedError, match=r"meta_train\.n_way=9"):
        meta_train(_backbone(), spec, train, novel_val, MetaTrainConfig(n_way=9), CPU)


def test_a_log_gets_a_progress_line_per_validation(pools, capsys):
    spec, train, _, novel_val = pools
    settings = MetaTrainConfig(episodes=4, n_way=3, k_shot=1, n_query=2, val_every=2)
    meta_train(_backbone(), spec, train, novel_val, settings, CPU)
    lines = capsys.readouterr().err.splitlines()  # captured stderr is not a terminal
    number, clock = r"\d+(\.\d+)?(e-?\d+)?", r"\d+:\d\d:\d\d"
    assert len(lines) == 2
    for episode, line in zip((2, 4), lines, strict=True):
        pattern = rf"meta-train \(protonet\): episode {episode}/4  loss={number}  val_acc={number}"
        assert re.fullmatch(rf"{pattern}  elapsed={clock}  eta={clock}", line), line
