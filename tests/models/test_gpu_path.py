"""The CUDA-only branches, forced through on the CPU where they can be: bfloat16 autocast and the float32
casts after it, the pinning decision, the memory layout per device, ``torch.compile`` (off and on, and
its checkpoints), and the refusals when CUDA or a compiler is absent."""

from __future__ import annotations

import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from fewshot_med.config import MetaTrainConfig, PretrainConfig, RuntimeConfig
from fewshot_med.data.demo import DEMO_BASE_CLASSES, make_demo_dataset
from fewshot_med.data.device_io import pins_memory, to_device
from fewshot_med.data.roles import ClassSubset, select_classes
from fewshot_med.data.transforms import channel_stats, to_model_input
from fewshot_med.errors import ConfigError
from fewshot_med.models import (
    BackboneSpec,
    backbone_from_state,
    create_backbone,
    embed,
    features,
    load_checkpoint,
)
from fewshot_med.runtime import resolve_device
from fewshot_med.training import meta as meta_module
from fewshot_med.training import pretrain as pretrain_module
from fewshot_med.training.meta import meta_train
from fewshot_med.training.pretrain import pretrain

CPU, CUDA, MPS = torch.device("cpu"), torch.device("cuda"), torch.device("mps")
SIZE = 16
ONE_STEP = PretrainConfig(epochs=1, batch_size=16, steps_per_epoch=1, warmup_epochs=0, augment=False)
NO_CPU_COMPILER = features.compile_blocker("cpu")


@pytest.fixture(scope="module")
def data() -> tuple[ClassSubset, ClassSubset, BackboneSpec]:
    dataset = make_demo_dataset(image_size=SIZE, images_per_common_class=80, images_per_rare_class=40)
    train = select_classes(dataset, "train", DEMO_BASE_CLASSES)
    val = select_classes(dataset, "val", DEMO_BASE_CLASSES)
    mean, std = channel_stats(train.images)
    return train, val, BackboneSpec("resnet10t", 3, SIZE, mean, std)


def fresh_backbone() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_backbone("resnet10t", image_size=SIZE)


@pytest.fixture
def forced_autocast(monkeypatch: pytest.MonkeyPatch) -> None:
    """bfloat16 autocast on the CPU too: the branch CUDA takes."""
    monkeypatch.setattr(features, "uses_autocast", lambda device: True)


def test_autocast_runs_in_bfloat16_on_cuda_only():
    assert (
        features.uses_autocast(CUDA) and not features.uses_autocast(CPU) and not features.uses_autocast(MPS)
    )
    assert torch.bfloat16 == features.AUTOCAST_DTYPE
    layer = torch.nn.Linear(4, 2)
    with features.autocast(CPU):
        assert layer(torch.ones(1, 4)).dtype == torch.float32


def test_forced_autocast_computes_in_bfloat16(forced_autocast):
    layer = torch.nn.Linear(4, 2)
    with features.autocast(CPU):
        assert layer(torch.ones(1, 4)).dtype == torch.bfloat16


def test_embed_casts_autocast_features_back_to_float32(data, forced_autocast, monkeypatch):
    train, _, spec = data
    backbone = fresh_backbone()
    mixed = embed(backbone, train.images[:8], spec, CPU)
    monkeypatch.setattr(features, "uses_autocast", lambda device: False)
    full = embed(backbone, train.images[:8], spec, CPU)
    assert mixed.dtype == full.dtype == torch.float32
    assert not torch.equal(mixed, full)  # bfloat16 really ran
    torch.testing.assert_close(mixed, full, rtol=0.05, atol=0.05)  # bfloat16 keeps ~3 significant digits


def test_pretraining_under_forced_autocast_gives_finite_float32_losses(data, forced_autocast):
    train, val, spec = data
    result = pretrain(fresh_backbone(), spec, train, val, ONE_STEP, CPU)
    record = result.history[0]
    assert np.isfinite(record["train_loss"]) and np.isfinite(record["val_loss"])
    assert next(result.backbone.parameters()).dtype == torch.float32  # autocast never casts the weights


def test_only_a_cpu_batch_bound_for_cuda_is_pinned():
    batch = torch.zeros(2, 3, dtype=torch.uint8)
    assert pins_memory(batch, CUDA) and pins_memory(batch, "cuda:1")
    assert not pins_memory(batch, CPU) and not pins_memory(batch, MPS)
    assert to_device(batch, CPU) is batch  # the CPU path copies nothing


def test_model_input_is_unchanged_on_the_cpu():
    images = np.random.default_rng(0).integers(0, 256, size=(2, 4, 4, 3), dtype=np.uint8)
    batch = to_model_input(images, (0.5,) * 3, (0.25,) * 3, 3, CPU)
    expected = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.25
    torch.testing.assert_close(batch, expected)
    assert batch.is_contiguous()


def test_memory_layout_per_device():
    assert pretrain_module._memory_format(CUDA) == torch.channels_last
    assert pretrain_module._memory_format(CPU) == torch.channels_last
    assert pretrain_module._memory_format(MPS) == torch.contiguous_format
    assert features.inference_memory_format(CUDA) == torch.channels_last
    assert features.inference_memory_format(CPU) == torch.contiguous_format


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
@pytest.mark.parametrize("name", ["cuda", "cuda:1"])
def test_cuda_is_refused_where_there_is_none(name):
    with pytest.raises(ConfigError, match=f"runtime.device '{name}': CUDA is not available here"):
        resolve_device(name)


def _executable(path: Path) -> str:
    path.write_text("#!/bin/sh\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def test_compile_blocker_names_the_missing_compiler(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no compiler on it
    for variable in ("CC", "CXX"):
        monkeypatch.delenv(variable, raising=False)
    assert "C++ compiler 'g++'" in features.compile_blocker("cpu")
    assert features.compile_blocker("cuda") is not None
    monkeypatch.setenv("CXX", _executable(tmp_path / "my-c++"))
    assert features.compile_blocker("cpu") is None


def test_compile_without_a_compiler_is_refused_at_validation_and_before_any_work(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(ValidationError, match=r"runtime\.compile: TorchInductor.s CPU kernels need"):
        RuntimeConfig(device="cpu", compile=True)
    assert RuntimeConfig(device="cpu", compile=False).compile is False
    with pytest.raises(ConfigError, match=r"set runtime\.compile: false"):
        features.compiled(torch.nn.Linear(2, 2), CPU)


@pytest.mark.parametrize(("algorithm", "compiles"), [("protonet", True), ("anil", True), ("fomaml", False)])
def test_meta_training_steps_through_the_compiled_forward_where_it_can(
    data, monkeypatch, algorithm, compiles
):
    train, val, spec = data
    wrappers, stepped = [], []
    real = meta_module.ALGORITHMS[algorithm]

    def fake_compiled(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        wrappers.append(torch.nn.Sequential(module))  # shares the parameters, as torch.compile's wrapper
        return wrappers[-1]

    def recording_step(backbone, batch, settings):
        stepped.append(backbone)
        return real.step(backbone, batch, settings)

    monkeypatch.setattr(meta_module, "compiled", fake_compiled)
    monkeypatch.setitem(
        meta_module.ALGORITHMS, algorithm, meta_module.MetaAlgorithm(recording_step, real.episode_model)
    )
    settings = MetaTrainConfig(
        algorithm=algorithm, episodes=1, val_every=1, k_shot=1, n_query=2, inner_steps=1, keep="last"
    )
    backbone = fresh_backbone()
    before = [p.detach().clone() for p in backbone.parameters()]
    result = meta_train(backbone, spec, train, val, settings, CPU, compile_backbone=True)
    assert stepped == (wrappers if compiles else [backbone]) and len(stepped) == 1
    assert any(
        not torch.equal(a, b) for a, b in zip(before, result.backbone.parameters(), strict=True)
    )  # the step trained it


@pytest.mark.slow
@pytest.mark.skipif(NO_CPU_COMPILER is not None, reason=f"torch.compile needs a compiler: {NO_CPU_COMPILER}")
def test_compiled_pretraining_matches_eager_and_checkpoints_a_plain_backbone(data, tmp_path):
    torch.set_num_threads(1)
    train, val, spec = data
    eager = pretrain(fresh_backbone(), spec, train, val, ONE_STEP, CPU, checkpoint_path=tmp_path / "eager.pt")
    result = pretrain(
        fresh_backbone(),
        spec,
        train,
        val,
        ONE_STEP,
        CPU,
        checkpoint_path=tmp_path / "c.pt",
        compile_backbone=True,
    )
    assert result.history[0]["train_loss"] == pytest.approx(eager.history[0]["train_loss"], abs=1e-4)
    state = load_checkpoint(tmp_path / "c.pt")
    assert not any(key.startswith("_orig_mod.") for key in state["backbone"])
    plain, _ = backbone_from_state(state)  # a plain timm backbone loads it, strictly
    for loaded, trained in zip(
        plain.state_dict().values(), result.backbone.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(loaded, trained.cpu())
    assert type(result.backbone).__name__ != "OptimizedModule"  # the next stage gets the plain module
    features_compiled = embed(result.backbone, train.images[:8], spec, CPU, compile=True)
    torch.testing.assert_close(
        features_compiled, embed(result.backbone, train.images[:8], spec, CPU), atol=1e-4, rtol=1e-4
    )
