"""Supervised pretraining: it learns, resumes bit for bit, stops early, balances classes, logs, and
collects SWAG moments on schedule."""

from __future__ import annotations

import dataclasses
import itertools
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from fewshot_med.config import PretrainConfig, SwagConfig
from fewshot_med.data.demo import DEMO_BASE_CLASSES, make_demo_dataset
from fewshot_med.data.roles import ClassSubset, select_classes
from fewshot_med.data.transforms import channel_stats
from fewshot_med.errors import FewshotMedError
from fewshot_med.models import BackboneSpec, backbone_from_state, create_backbone, embed, load_checkpoint
from fewshot_med.training import pretrain as pretrain_module
from fewshot_med.training.pretrain import PretrainResult, epoch_indices, pretrain, snapshot_steps

CPU = torch.device("cpu")
SIZE = 16
#: no augmentation, so that a few epochs learn: best val balanced accuracy 0.63-0.65 measured (seeds 0, 1)
LEARNING = PretrainConfig(epochs=5, batch_size=32, lr=3e-3, warmup_epochs=0, augment=False)
LEARNED_BALANCED_ACCURACY = 0.4  # chance is 0.2
TIMING_KEYS = {"images_per_second", "epoch_seconds"}


@pytest.fixture(scope="module")
def data() -> tuple[ClassSubset, ClassSubset, BackboneSpec]:
    dataset = make_demo_dataset(image_size=SIZE, images_per_common_class=150, images_per_rare_class=40)
    train = select_classes(dataset, "train", DEMO_BASE_CLASSES)
    val = select_classes(dataset, "val", DEMO_BASE_CLASSES)
    mean, std = channel_stats(train.images)
    return train, val, BackboneSpec("resnet10t", 3, SIZE, mean, std)


def fresh_backbone(spec: BackboneSpec) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_backbone(spec.name, in_chans=spec.in_chans, image_size=spec.image_size)


def resume_pretraining(path: Path, data, settings: PretrainConfig, **kwargs: object) -> PretrainResult:
    """Pretraining resumed from the checkpoint at ``path``, on a freshly built backbone."""
    train, val, spec = data
    backbone = create_backbone("resnet10t", image_size=SIZE)
    return pretrain(backbone, spec, train, val, settings, CPU, checkpoint_path=path, resume=True, **kwargs)


def quick(**changes: object) -> PretrainConfig:
    """A few steps per epoch, augmentation and balanced sampling on: exercises every random source."""
    values = {"epochs": 4, "batch_size": 32, "steps_per_epoch": 3, "warmup_epochs": 1, "lr": 3e-3}
    return PretrainConfig(**{**values, **changes})


@pytest.fixture(scope="module")
def learned(data, tmp_path_factory) -> tuple[PretrainResult, list[tuple[dict[str, float], int]], Path]:
    train, val, spec = data
    calls: list[tuple[dict[str, float], int]] = []
    path = tmp_path_factory.mktemp("pretrain") / "pretrain.pt"
    result = pretrain(
        fresh_backbone(spec),
        spec,
        train,
        val,
        LEARNING,
        CPU,
        checkpoint_path=path,
        log_metrics=lambda metrics, step: calls.append((metrics, step)),
    )
    return result, calls, path


def test_training_learns_the_base_classes(learned, data):
    result, _, _ = learned
    _, val, spec = data
    assert len(result.history) == 5 and not result.stopped_early
    assert result.best_val_balanced_accuracy > LEARNED_BALANCED_ACCURACY
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert result.best_val_balanced_accuracy == max(h["val_balanced_accuracy"] for h in result.history)
    assert result.history[result.best_epoch - 1]["val_balanced_accuracy"] == result.best_val_balanced_accuracy
    # the returned backbone and head reproduce the best epoch's val accuracy
    features = embed(result.backbone, val.images, spec, CPU)
    with torch.no_grad():
        predicted = result.head(features).argmax(dim=1).numpy()
    best = result.history[result.best_epoch - 1]
    assert np.isclose((predicted == val.labels).mean(), best["val_accuracy"])
    assert result.head.out_features == len(DEMO_BASE_CLASSES)


def test_log_metrics_gets_the_record_once_per_epoch(learned):
    result, calls, _ = learned
    assert [step for _, step in calls] == [1, 2, 3, 4, 5]
    expected = {
        "train_loss",
        "train_accuracy",
        "val_loss",
        "val_accuracy",
        "val_balanced_accuracy",
        "lr",
        "images_per_second",
        "epoch_seconds",
        "best_val_balanced_accuracy",
    }
    for (metrics, _), record in zip(calls, result.history, strict=True):
        assert set(metrics) == expected
        assert all(isinstance(value, float) for value in metrics.values())
        assert metrics["val_balanced_accuracy"] == record["val_balanced_accuracy"]
        assert metrics["images_per_second"] > 0


def test_finished_checkpoint_is_returned_without_training(learned, data):
    result, _, path = learned
    spec = data[2]
    calls = []
    again = resume_pretraining(path, data, LEARNING, log_metrics=lambda metrics, step: calls.append(step))
    assert calls == [] and again.history == result.history and again.best_epoch == result.best_epoch
    assert_same_weights(again.backbone, result.backbone)
    assert torch.equal(again.head.weight, result.head.weight)
    # the checkpoint rebuilds the best backbone on its own
    rebuilt, rebuilt_spec = backbone_from_state(load_checkpoint(path))
    assert rebuilt_spec == spec
    assert_same_weights(rebuilt, result.backbone)


class Interrupted(Exception):
    pass


def interrupt_after_second_epoch(data, settings: PretrainConfig, path: Path, logged_step: int = 2) -> None:
    """Pretrain a fresh backbone with checkpoints at ``path`` and interrupt it after the epoch logged at
    ``logged_step`` (epoch 2; born-again generations count their epochs on)."""
    train, val, spec = data

    def interrupt(metrics: dict[str, float], step: int) -> None:
        if step == logged_step:
            raise Interrupted  # the checkpoint of that epoch is written before the metrics are logged

    with pytest.raises(Interrupted):
        pretrain(
            fresh_backbone(spec), spec, train, val, settings, CPU, checkpoint_path=path, log_metrics=interrupt
        )


def test_resume_after_interruption_reproduces_the_uninterrupted_weights(data, tmp_path):
    train, val, spec = data
    settings = quick()
    whole = pretrain(fresh_backbone(spec), spec, train, val, settings, CPU, checkpoint_path=tmp_path / "a.pt")

    path = tmp_path / "b.pt"
    interrupt_after_second_epoch(data, settings, path)
    assert load_checkpoint(path)["epoch"] == 2
    steps = []
    torch.manual_seed(123)  # the global RNG state is restored from the checkpoint, whatever it is now
    resumed = resume_pretraining(path, data, settings, log_metrics=lambda metrics, step: steps.append(step))
    assert steps == [3, 4]
    assert_same_weights(resumed.backbone, whole.backbone)
    assert torch.equal(resumed.head.weight, whole.head.weight)
    assert strip_timing(resumed.history) == strip_timing(whole.history)
    last_whole, last_resumed = load_checkpoint(tmp_path / "a.pt"), load_checkpoint(path)
    for key, value in last_whole["current"]["backbone"].items():
        assert torch.equal(value, last_resumed["current"]["backbone"][key]), key


def test_mixing_resumes_to_the_same_weights_and_changes_the_trajectory(data, tmp_path):
    train, val, spec = data
    settings = quick(mixing="mixup_or_cutmix")
    whole = pretrain(fresh_backbone(spec), spec, train, val, settings, CPU)
    path = tmp_path / "mixed.pt"
    interrupt_after_second_epoch(data, settings, path)
    resumed = resume_pretraining(path, data, settings)
    assert_same_weights(resumed.backbone, whole.backbone)
    unmixed = pretrain(fresh_backbone(spec), spec, train, val, quick(), CPU)
    assert not np.array_equal(trainable(unmixed.backbone), trainable(whole.backbone))


def test_mixup_blends_images_and_labels_in_the_same_proportion():
    images = torch.rand(6, 3, 8, 8)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    torch.manual_seed(0)
    mixed, proportions = pretrain_module.mixing_transform("mixup", 3, 1.0)(images, labels)
    share = proportions[0, 0].item()  # torchvision pairs each image with the previous one (a roll by 1)
    assert torch.allclose(mixed, share * images + (1 - share) * images.roll(1, dims=0), atol=1e-6)
    expected = share * torch.eye(3)[labels] + (1 - share) * torch.eye(3)[labels.roll(1)]
    assert torch.allclose(proportions, expected, atol=1e-6)
    assert pretrain_module.mixing_transform("none", 3, 1.0) is None


def test_the_contrastive_loss_resumes_to_the_same_weights_and_changes_the_trajectory(data, tmp_path):
    train, val, spec = data
    settings = quick(contrastive_weight=0.5)
    whole = pretrain(fresh_backbone(spec), spec, train, val, settings, CPU)
    path = tmp_path / "contrastive.pt"
    interrupt_after_second_epoch(data, settings, path)
    assert "projection" in load_checkpoint(path)["current"]  # the projection head resumes too
    resumed = resume_pretraining(path, data, settings)
    assert_same_weights(resumed.backbone, whole.backbone)
    supervised = pretrain(fresh_backbone(spec), spec, train, val, quick(), CPU)
    assert not np.array_equal(trainable(supervised.backbone), trainable(whole.backbone))
    # the reported loss holds the weighted NT-Xent term (0.56 measured; log(2 * 32 - 1) = 4.1 at chance)
    assert whole.history[-1]["train_loss"] > supervised.history[-1]["train_loss"] + 0.25


def test_a_pretrained_start_recipe_resumes_across_the_head_warmup_to_the_same_weights(data, tmp_path):
    train, val, spec = data
    settings = quick(head_warmup_epochs=2, layer_decay=0.7, freeze_bn_stats=True)
    whole = pretrain(fresh_backbone(spec), spec, train, val, settings, CPU)
    path = tmp_path / "recipe.pt"
    interrupt_after_second_epoch(data, settings, path)  # the last epoch of the head warm-up
    resumed = resume_pretraining(path, data, settings)
    assert_same_weights(resumed.backbone, whole.backbone)
    assert [h["lr"] for h in resumed.history] == [h["lr"] for h in whole.history]


def test_born_again_trains_the_start_again_against_the_plain_recipe_and_resumes_mid_generation(
    data, tmp_path
):
    train, val, spec = data
    settings = quick(born_again_generations=1)
    steps: list[tuple[int, float]] = []
    path = tmp_path / "student.pt"
    whole = pretrain(
        fresh_backbone(spec),
        spec,
        train,
        val,
        settings,
        CPU,
        checkpoint_path=path,
        log_metrics=lambda metrics, step: steps.append((step, metrics["generation"])),
    )
    assert steps == [(1, 0.0), (2, 0.0), (3, 0.0), (4, 0.0), (5, 1.0), (6, 1.0), (7, 1.0), (8, 1.0)]
    assert [h["generation"] for h in whole.history] == [0.0] * 4 + [1.0] * 4
    # generation 0 is the plain recipe, checkpointed beside the handed-on student
    plain = pretrain(fresh_backbone(spec), spec, train, val, quick(), CPU)
    teacher, _ = backbone_from_state(load_checkpoint(tmp_path / "student.generation0.pt"))
    assert_same_weights(teacher, plain.backbone)
    assert not np.array_equal(trainable(whole.backbone), trainable(plain.backbone))
    student, _ = backbone_from_state(load_checkpoint(path))
    assert_same_weights(student, whole.backbone)

    resumed_path = tmp_path / "resumed.pt"
    interrupt_after_second_epoch(data, settings, resumed_path, logged_step=6)  # epoch 2 of generation 1
    assert load_checkpoint(resumed_path)["epoch"] == 2
    resumed = resume_pretraining(resumed_path, data, settings)
    assert_same_weights(resumed.backbone, whole.backbone)
    assert strip_timing(resumed.history) == strip_timing(whole.history)


def test_the_distillation_loss_is_the_tempered_kl_divergence_times_t_squared():
    torch.manual_seed(0)
    student, teacher, temperature = torch.randn(5, 4), torch.randn(5, 4), 3.0
    p_teacher = torch.softmax(teacher / temperature, dim=1)
    log_student = torch.log_softmax(student / temperature, dim=1)
    expected = (p_teacher * (p_teacher.log() - log_student)).sum(dim=1).mean() * temperature**2
    loss = pretrain_module.distillation_loss(student, teacher, temperature)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert pretrain_module.distillation_loss(teacher, teacher, temperature).item() == pytest.approx(
        0.0, abs=1e-6
    )


def test_the_contrastive_loss_is_nt_xent_with_each_view_paired_to_its_twin():
    torch.manual_seed(0)
    projections, temperature = torch.randn(8, 5), 0.3  # rows i and 4 + i are two views of image i
    unit = torch.nn.functional.normalize(projections, dim=1)
    similarity = unit @ unit.T / temperature
    twin = torch.arange(8).roll(4)
    expected = torch.stack(
        [torch.logsumexp(similarity[i][torch.arange(8) != i], 0) - similarity[i, twin[i]] for i in range(8)]
    ).mean()
    assert pretrain_module.contrastive_loss(projections, temperature).item() == pytest.approx(
        expected.item(), rel=1e-5
    )
    agreeing = torch.cat([unit[:4], unit[:4]])  # identical twins score lower than unrelated rows
    assert pretrain_module.contrastive_loss(agreeing, temperature) < pretrain_module.contrastive_loss(
        projections, temperature
    )


@pytest.mark.parametrize(
    ("changes", "message"),
    [({"augment": False}, "set augment: true"), ({"mixing": "cutmix"}, "set mixing: none")],
)
def test_the_contrastive_loss_refuses_settings_without_two_distinct_views(changes, message):
    with pytest.raises(ValueError, match=message):
        PretrainConfig(contrastive_weight=0.5, **changes)


def trainable(module: torch.nn.Module) -> np.ndarray:
    """The module's trainable parameters flattened in ``named_parameters()`` order, float64."""
    return (
        torch.cat([p.detach().reshape(-1) for p in module.parameters() if p.requires_grad]).double().numpy()
    )


def test_swag_snapshots_the_last_epochs_whichever_epoch_is_kept(data, monkeypatch):
    train, val, spec = data
    scripted = iter([0.9, 0.3, 0.2])  # keep="best" hands on epoch 1, before SWAG starts
    monkeypatch.setattr(
        pretrain_module,
        "_validate",
        lambda *a, **k: {"val_loss": 1.0, "val_accuracy": 0.5, "val_balanced_accuracy": next(scripted)},
    )
    swag = SwagConfig(enabled=True, start_epoch=2, rank=2)
    settings = quick(epochs=3, steps_per_epoch=2, early_stopping_patience=None, swag=swag)
    backbone = fresh_backbone(spec)
    at_epoch_end = {}

    def record(metrics: dict[str, float], epoch: int) -> None:
        at_epoch_end[epoch] = trainable(backbone)

    result = pretrain(backbone, spec, train, val, settings, CPU, log_metrics=record)
    posterior = result.swag
    assert result.best_epoch == 1
    assert posterior is not None and posterior.n_snapshots == 2 and posterior.rank == 2
    assert list(posterior.names) == [n for n, p in backbone.named_parameters() if p.requires_grad]
    snapshots = np.stack([at_epoch_end[2], at_epoch_end[3]])  # one snapshot per epoch, after its last step
    np.testing.assert_allclose(posterior.mean.numpy(), snapshots.mean(axis=0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(
        posterior.variance.numpy(), np.maximum(snapshots.var(axis=0), 1e-30), rtol=1e-4, atol=1e-12
    )
    np.testing.assert_allclose(trainable(result.backbone), at_epoch_end[1])


def test_swag_schedule():
    assert SwagConfig().first_epoch(30) == 23 and SwagConfig(start_epoch=5).first_epoch(30) == 5
    assert snapshot_steps(10, 3) == {3, 6, 9} and snapshot_steps(3, 2) == {1, 2}
    assert snapshot_steps(5, 1) == {4} and snapshot_steps(2, 5) == {0, 1}


def test_swag_needs_two_snapshots_of_the_actual_steps(data):
    train, val, spec = data
    swag = SwagConfig(enabled=True, start_epoch=1, snapshots_per_epoch=2)
    settings = quick(epochs=1, steps_per_epoch=1, early_stopping_patience=None, swag=swag)
    with pytest.raises(FewshotMedError, match=r"SWAG would take 1 snapshot \(epochs 1-1, 1 step\(s\) each\)"):
        pretrain(fresh_backbone(spec), spec, train, val, settings, CPU)


def test_swag_leaves_the_trajectory_alone_and_resumes_to_the_same_moments(data, tmp_path):
    train, val, spec = data
    plain = quick(epochs=3, steps_per_epoch=2, early_stopping_patience=None)
    swag = SwagConfig(enabled=True, start_epoch=2, rank=3, snapshots_per_epoch=2)  # 4 snapshots, 3 kept
    settings = plain.model_copy(update={"swag": swag})
    without = pretrain(fresh_backbone(spec), spec, train, val, plain, CPU)
    whole = pretrain(fresh_backbone(spec), spec, train, val, settings, CPU, checkpoint_path=tmp_path / "a.pt")
    assert without.swag is None
    assert_same_weights(whole.backbone, without.backbone)
    assert whole.swag is not None and whole.swag.n_snapshots == 4 and whole.swag.rank == 3

    path = tmp_path / "b.pt"
    interrupt_after_second_epoch(data, settings, path)
    assert load_checkpoint(path)["swag"]["n_snapshots"] == 2
    resumed = resume_pretraining(path, data, settings)
    finished = resume_pretraining(path, data, settings)
    for again in (resumed, finished):
        assert again.swag is not None and again.swag.n_snapshots == 4
        for field in ("mean", "variance", "deviations"):
            assert torch.equal(getattr(again.swag, field), getattr(whole.swag, field)), field


def test_early_stopping_keeps_the_best_epoch(data, monkeypatch):
    train, val, spec = data
    scripted = iter([0.3, 0.5, 0.4, 0.45, 0.9, 0.95])

    def fake_validate(*args: object, **kwargs: object) -> dict[str, float]:
        return {"val_loss": 1.0, "val_accuracy": 0.5, "val_balanced_accuracy": next(scripted)}

    monkeypatch.setattr(pretrain_module, "_validate", fake_validate)
    backbone = fresh_backbone(spec)
    snapshots = []

    def snapshot(metrics: dict[str, float], epoch: int) -> None:
        snapshots.append({k: v.clone() for k, v in backbone.state_dict().items()})

    result = pretrain(
        backbone,
        spec,
        train,
        val,
        quick(epochs=6, early_stopping_patience=2, steps_per_epoch=1),
        CPU,
        log_metrics=snapshot,
    )
    assert result.stopped_early and len(result.history) == 4
    assert result.best_epoch == 2 and result.best_val_balanced_accuracy == 0.5
    for key, value in result.backbone.state_dict().items():
        assert torch.equal(value, snapshots[1][key]), key
    assert not torch.equal(snapshots[1]["conv1.0.weight"], snapshots[3]["conv1.0.weight"])


def test_keep_last_hands_on_the_last_epoch_and_never_stops_early(data, monkeypatch):
    train, val, spec = data
    scripted = iter([0.9, 0.3, 0.2, 0.1])  # would stop early and keep epoch 1 in the "best" mode
    monkeypatch.setattr(
        pretrain_module,
        "_validate",
        lambda *a, **k: {"val_loss": 1.0, "val_accuracy": 0.5, "val_balanced_accuracy": next(scripted)},
    )
    backbone = fresh_backbone(spec)
    snapshots = []

    def snapshot(metrics: dict[str, float], epoch: int) -> None:
        snapshots.append({k: v.clone() for k, v in backbone.state_dict().items()})

    settings = quick(epochs=4, early_stopping_patience=1, steps_per_epoch=1, keep="last")
    result = pretrain(backbone, spec, train, val, settings, CPU, log_metrics=snapshot)
    assert not result.stopped_early and len(result.history) == 4
    assert result.best_epoch == 4 and result.best_val_balanced_accuracy == 0.1
    for key, value in result.backbone.state_dict().items():
        assert torch.equal(value, snapshots[3][key]), key
    assert not torch.equal(snapshots[0]["conv1.0.weight"], snapshots[3]["conv1.0.weight"])


def test_balanced_sampling_draws_classes_equally_often():
    labels = np.repeat(np.arange(4), [600, 200, 50, 10])
    rows = epoch_indices(labels, True, 40_000, np.random.default_rng(0))
    frequencies = np.bincount(labels[rows], minlength=4) / rows.size
    np.testing.assert_allclose(frequencies, 0.25, atol=0.015)
    shuffled = epoch_indices(labels, False, labels.size, np.random.default_rng(0))
    assert sorted(shuffled.tolist()) == list(range(labels.size))
    assert not np.array_equal(shuffled, np.arange(labels.size))
    assert epoch_indices(labels, False, 100, np.random.default_rng(0)).shape == (100,)
    again = epoch_indices(labels, True, 50, np.random.default_rng(1))
    assert np.array_equal(again, epoch_indices(labels, True, 50, np.random.default_rng(1)))


def test_lr_schedule_warms_up_then_decays_to_zero():
    factors = [pretrain_module.lr_factor(step, 10, 100, "cosine") for step in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == 1.0 and factors[10] == 1.0
    assert all(a >= b for a, b in itertools.pairwise(factors[10:]))
    assert factors[-1] < 1e-3
    assert pretrain_module.lr_factor(50, 10, 100, "constant") == 1.0


def test_no_weight_decay_on_norms_and_biases(data):
    _, _, spec = data
    backbone = fresh_backbone(spec)
    head = torch.nn.Linear(backbone.num_features, 3)
    decay, no_decay = pretrain_module.parameter_groups([backbone, head], 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert any(p is head.bias for p in no_decay["params"]) and any(p is head.weight for p in decay["params"])


def test_layer_decay_lowers_the_rate_of_earlier_blocks_and_keeps_the_head_at_lr(data):
    _, _, spec = data
    backbone = fresh_backbone(spec)  # resnet10t: the stem and 4 one-block stages, 5 timm layer groups
    head = torch.nn.Linear(backbone.num_features, 3)
    plain = pretrain_module.optimizer_groups(backbone, [head], PretrainConfig(lr=0.1))
    assert {group["lr"] for group in plain} == {0.1}
    groups = pretrain_module.optimizer_groups(backbone, [head], PretrainConfig(lr=0.1, layer_decay=0.5))
    rate = {id(param): group["lr"] for group in groups for param in group["params"]}
    decay = {id(param): group["weight_decay"] for group in groups for param in group["params"]}
    assert len(rate) == sum(1 for _ in itertools.chain(backbone.parameters(), head.parameters()))
    assert rate[id(head.weight)] == rate[id(head.bias)] == 0.1
    assert rate[id(backbone.conv1[0].weight)] == pytest.approx(0.1 * 0.5**4)
    assert rate[id(backbone.layer1[0].conv1.weight)] == pytest.approx(0.1 * 0.5**3)
    assert rate[id(backbone.layer4[0].conv1.weight)] == pytest.approx(0.1)
    assert all((decay[id(p)] == 0.05) == (p.ndim > 1) for p in backbone.parameters())
    flags = {
        id(param): group[pretrain_module.BACKBONE_GROUP] for group in groups for param in group["params"]
    }
    assert not flags[id(head.weight)] and all(flags[id(p)] for p in backbone.parameters())


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


def _changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    return {name for name, value in before.items() if not torch.equal(value, after[name])}


def test_head_warmup_trains_the_head_alone_then_the_backbone_joins(data):
    train, val, spec = data
    backbone = fresh_backbone(spec)
    start = _state(backbone)
    after_epoch: list[dict[str, torch.Tensor]] = []
    rates: list[float] = []
    pretrain(
        backbone,
        spec,
        train,
        val,
        quick(epochs=3, head_warmup_epochs=1, keep="last"),
        CPU,
        log_metrics=lambda metrics, step: (after_epoch.append(_state(backbone)), rates.append(metrics["lr"])),
    )
    assert not _changed(start, after_epoch[0])  # weights and batch-norm statistics as loaded
    moved = _changed(start, after_epoch[1])
    assert any(name.endswith("running_mean") for name in moved) and "conv1.0.weight" in moved
    assert rates[0] > 0  # the head trained during the warm-up (the reported rate is the head's)


def test_frozen_bn_statistics_stay_as_loaded_while_the_weights_train(data):
    train, val, spec = data
    backbone = fresh_backbone(spec)
    start = _state(backbone)
    pretrain(backbone, spec, train, val, quick(epochs=2, freeze_bn_stats=True, keep="last"), CPU)
    moved = _changed(start, _state(backbone))
    statistics = {
        name for name in start if name.endswith(("running_mean", "running_var", "num_batches_tracked"))
    }
    assert statistics and not moved & statistics
    assert "conv1.0.weight" in moved and "bn1.weight" in moved  # convolutions and BN affine parameters train


def test_a_head_warmup_as_long_as_the_run_is_refused():
    with pytest.raises(ValueError, match="head_warmup_epochs 3 leaves no epoch of 3"):
        PretrainConfig(epochs=3, head_warmup_epochs=3)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("pretrain.distill_weight=0", "pretrain.distill_weight"),
        ("pretrain.born_again_generations=6", "pretrain.born_again_generations"),
        ("pretrain.distill_temperature=0", "pretrain.distill_temperature"),
    ],
)
def test_born_again_settings_out_of_range_are_refused_naming_the_key(override, key):
    from fewshot_med.config import load_config

    with pytest.raises(FewshotMedError, match=re.escape(key)):
        load_config(Path(__file__).parents[2] / "configs" / "quickstart.yaml", [override])


@pytest.fixture(scope="module")
def short_checkpoint(data, tmp_path_factory) -> tuple[PretrainConfig, Path]:
    train, val, spec = data
    settings = quick(epochs=2, steps_per_epoch=1)
    path = tmp_path_factory.mktemp("short") / "pretrain.pt"
    pretrain(fresh_backbone(spec), spec, train, val, settings, CPU, checkpoint_path=path)
    return settings, path


@pytest.mark.parametrize(
    "change",
    [
        {"settings": {"lr": 1e-3}},
        {"spec": {"image_size": 32}},
        {"spec": {"name": "resnet18"}},
        {"seed": 1},
    ],
    ids=["settings", "image_size", "backbone", "seed"],
)
def test_resuming_a_foreign_checkpoint_is_refused(data, short_checkpoint, change):
    train, val, spec = data
    settings, path = short_checkpoint
    other_spec = dataclasses.replace(spec, **change.get("spec", {}))
    other_settings = settings.model_copy(update=change.get("settings", {}))
    with pytest.raises(FewshotMedError, match="checkpoint was written") as error:
        pretrain(
            create_backbone(other_spec.name, image_size=other_spec.image_size),
            other_spec,
            train,
            val,
            other_settings,
            CPU,
            checkpoint_path=path,
            resume=True,
            seed=change.get("seed", 0),
        )
    assert "\n" not in str(error.value)


def test_resuming_a_checkpoint_of_another_kind_is_refused(data, tmp_path):
    train, val, spec = data
    path = tmp_path / "other.pt"
    torch.save({"backbone": {}}, path)
    with pytest.raises(FewshotMedError, match="not a pretraining checkpoint"):
        pretrain(fresh_backbone(spec), spec, train, val, quick(), CPU, checkpoint_path=path, resume=True)


def test_tiny_inputs(data):
    train, val, spec = data
    tiny_train = subset(train, np.flatnonzero(train.labels < 2)[:5])
    tiny_val = subset(val, np.arange(1))
    settings = quick(epochs=2, batch_size=64, optimizer="sgd", schedule="constant", balanced_sampling=False)
    result = pretrain(fresh_backbone(spec), spec, tiny_train, tiny_val, settings, CPU)
    assert len(result.history) == 2
    assert all(np.isfinite(h["train_loss"]) and np.isfinite(h["val_loss"]) for h in result.history)
    with pytest.raises(FewshotMedError, match="no images"):
        pretrain(fresh_backbone(spec), spec, tiny_train, subset(val, np.arange(0)), settings, CPU)
    with pytest.raises(FewshotMedError, match="at least 2"):
        pretrain(fresh_backbone(spec), spec, subset(train, np.arange(1)), tiny_val, settings, CPU)


def subset(data: ClassSubset, rows: np.ndarray) -> ClassSubset:
    return dataclasses.replace(
        data, images=data.images[rows], labels=data.labels[rows], indices=data.indices[rows]
    )


def strip_timing(history: list[dict[str, float]]) -> list[dict[str, float]]:
    return [{k: v for k, v in record.items() if k not in TIMING_KEYS} for record in history]


def assert_same_weights(first: torch.nn.Module, second: torch.nn.Module) -> None:
    second_state = second.state_dict()
    for key, value in first.state_dict().items():
        assert torch.equal(value, second_state[key]), key


def test_a_log_gets_a_progress_line_per_epoch(data, capsys):
    train, val, spec = data
    pretrain(fresh_backbone(spec), spec, train, val, quick(epochs=3, steps_per_epoch=1), CPU)
    lines = capsys.readouterr().err.splitlines()  # captured stderr is not a terminal
    number, clock = r"\d+(\.\d+)?(e-?\d+)?", r"\d+:\d\d:\d\d"
    assert len(lines) == 3
    for epoch, line in enumerate(lines, start=1):
        pattern = (
            rf"pretrain: epoch {epoch}/3  loss={number}  val_bal_acc={number}  elapsed={clock}  eta={clock}"
        )
        assert re.fullmatch(pattern, line), line
