"""The GPU suite: images/s of fewshot-med's loops against bare PyTorch loops on the same CUDA device.

Two comparisons, each on one device with the same resnet10t, the same batch and the same GPU recipe in
both loops (bfloat16 autocast, channels_last model and batches, uint8 batches gathered on the host,
pinned and copied non-blocking, normalised on the device):

1. Pretraining: ``fewshot_med.training.pretrain`` (one warm-up epoch, then the second epoch's training
   steps, as its history reports them) against the plainest loop (random batches, forward, loss,
   backward, AdamW with the same parameter groups; warm-up steps untimed). No augmentation in either.
2. Evaluation embedding: ``fewshot_med.models.embed`` against a bare eval-mode forward pass over the
   same images, each after an untimed warm-up pass.

Both ours are measured again with ``torch.compile`` (``runtime.compile``) when a compiler is present.
The images are random uint8 (throughput does not depend on their content) at a clinical 224 px (32 px
under ``--quick``). Without a CUDA device the suite measures nothing: its section says it was skipped
and why, and the run still succeeds, so ``--suite all`` works on any machine. The measurement
functions take the device as an argument, so tests time them on the CPU.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from benchmarks.common import SuiteOptions, SuiteReport
from fewshot_med.config import PretrainConfig
from fewshot_med.data.roles import ClassSubset
from fewshot_med.data.transforms import channel_stats
from fewshot_med.models import BackboneSpec, create_backbone, embed
from fewshot_med.models.features import compile_blocker
from fewshot_med.training.pretrain import parameter_groups, pretrain

SUITE = "gpu"
BACKBONE = "resnet10t"
N_CLASSES = 4
#: the section without a CUDA device
SKIPPED = "skipped: no CUDA device"


@dataclass(frozen=True)
class Sizes:
    """How much one run measures.

    Attributes:
        image_size: side of the square RGB images.
        n_images: images in the training set and in the embedded pool (a multiple of ``batch_size``, so
            every batch has one shape and a compiled model compiles once).
        batch_size: images per step and per forward pass.
        steps: timed optimizer steps per pretraining loop.
        warmup_steps: untimed steps of the bare loop before its timed ones.
    """

    image_size: int
    n_images: int
    batch_size: int
    steps: int
    warmup_steps: int


FULL = Sizes(image_size=224, n_images=4096, batch_size=256, steps=40, warmup_steps=5)
QUICK = Sizes(image_size=32, n_images=256, batch_size=64, steps=3, warmup_steps=1)


def run(options: SuiteOptions) -> SuiteReport:
    """Measure on the first CUDA device; without one, a section that says the suite was skipped."""
    if not torch.cuda.is_available():
        return SuiteReport(
            markdown=f"## GPU path\n\n{SKIPPED}: torch.cuda.is_available() is false on this machine, so "
            "nothing was measured. Run `python -m benchmarks.run --suite gpu` on a machine with a GPU.\n",
            record={"gpu.skipped": "no CUDA device"},
        )
    if options.threads:
        torch.set_num_threads(options.threads)
    device = torch.device("cuda")
    compiles = compile_blocker(device.type) is None
    return measure(device, QUICK if options.quick else FULL, options.seed, compiles, options.quick)


def synthetic_data(sizes: Sizes, seed: int) -> tuple[ClassSubset, ClassSubset, BackboneSpec]:
    """Random uint8 ``(N, S, S, 3)`` train images with ``N_CLASSES`` balanced labels, a val set of one
    batch, and the spec the pretrain stage would build for them (channel statistics of the images)."""
    rng = np.random.default_rng(seed)

    def subset(n: int, split: str) -> ClassSubset:
        images = rng.integers(0, 256, size=(n, sizes.image_size, sizes.image_size, 3), dtype=np.uint8)
        labels = np.arange(n, dtype=np.int64) % N_CLASSES
        names = tuple(f"class{i}" for i in range(N_CLASSES))
        return ClassSubset(images, labels, np.arange(n), names, split, "synthetic")

    train, val = subset(sizes.n_images, "train"), subset(sizes.batch_size, "val")
    mean, std = channel_stats(train.images[: sizes.batch_size])
    return train, val, BackboneSpec(BACKBONE, 3, sizes.image_size, mean, std)


def bare_pretrain(
    train: ClassSubset, spec: BackboneSpec, sizes: Sizes, device: torch.device, seed: int
) -> float:
    """Images/s of the plainest GPU training loop on ``device``: ``sizes.steps`` timed AdamW steps
    after ``sizes.warmup_steps`` untimed ones, bfloat16 autocast on CUDA, channels_last, pinned copies."""
    torch.manual_seed(seed)
    model = create_backbone(spec.name, spec.in_chans, spec.image_size)
    head = nn.Linear(model.num_features, len(train.class_names))
    model = nn.Sequential(model, head).to(device, memory_format=torch.channels_last).train()
    settings = PretrainConfig()
    optimizer = torch.optim.AdamW(parameter_groups([model], settings.weight_decay), lr=settings.lr)
    criterion = nn.CrossEntropyLoss(label_smoothing=settings.label_smoothing)
    mean = torch.tensor(spec.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, device=device).view(1, -1, 1, 1)
    labels = torch.from_numpy(train.labels)
    rng = np.random.default_rng(seed)

    def step() -> None:
        rows = rng.integers(0, len(train), sizes.batch_size)
        images, targets = (
            _to_device(torch.from_numpy(train.images[rows]), device),
            _to_device(labels[rows], device),
        )
        images = ((images.permute(0, 3, 1, 2).float() / 255 - mean) / std).contiguous(
            memory_format=torch.channels_last
        )
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = criterion(model(images), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return _images_per_second(step, sizes.warmup_steps, sizes.steps, sizes.batch_size, device)


def our_pretrain(
    train: ClassSubset,
    val: ClassSubset,
    spec: BackboneSpec,
    sizes: Sizes,
    device: torch.device,
    seed: int,
    compile_backbone: bool = False,
) -> float:
    """Images/s of ``pretrain``'s second epoch of ``sizes.steps`` steps (the first warms up: kernel
    selection, compilation), without augmentation."""
    settings = PretrainConfig(
        epochs=2, batch_size=sizes.batch_size, steps_per_epoch=sizes.steps, warmup_epochs=0, augment=False
    )
    torch.manual_seed(seed)
    backbone = create_backbone(spec.name, spec.in_chans, spec.image_size)
    result = pretrain(
        backbone, spec, train, val, settings, device, seed=seed, compile_backbone=compile_backbone
    )
    return float(result.history[-1]["images_per_second"])


def bare_embed(
    images: np.ndarray, spec: BackboneSpec, sizes: Sizes, device: torch.device, seed: int
) -> float:
    """Images/s of a bare eval-mode forward pass over ``images`` ``(N, H, W, 3)`` uint8 on ``device``,
    features back on the host, after one untimed batch."""
    torch.manual_seed(seed)
    model = create_backbone(spec.name, spec.in_chans, spec.image_size)
    model = model.to(device, memory_format=torch.channels_last).eval()
    mean = torch.tensor(spec.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, device=device).view(1, -1, 1, 1)

    @torch.inference_mode()
    def forward(batch: np.ndarray) -> torch.Tensor:
        inputs = _to_device(torch.from_numpy(batch), device).permute(0, 3, 1, 2).float() / 255
        inputs = ((inputs - mean) / std).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            return model(inputs).float().cpu()

    def every_batch() -> None:
        for start in range(0, len(images), sizes.batch_size):
            forward(images[start : start + sizes.batch_size])

    forward(images[: sizes.batch_size])
    return len(images) / _seconds(every_batch, 1, device)


def our_embed(
    images: np.ndarray,
    spec: BackboneSpec,
    sizes: Sizes,
    device: torch.device,
    seed: int,
    compile: bool = False,
) -> float:
    """Images/s of ``embed`` over ``images`` on ``device`` (batch ``sizes.batch_size``), after one untimed
    call on one batch (which also compiles, with ``compile``)."""
    torch.manual_seed(seed)
    backbone = create_backbone(spec.name, spec.in_chans, spec.image_size).to(device)
    embed(backbone, images[: sizes.batch_size], spec, device, sizes.batch_size, compile)
    return len(images) / _seconds(
        lambda: embed(backbone, images, spec, device, sizes.batch_size, compile), 1, device
    )


def measure(
    device: torch.device, sizes: Sizes, seed: int, compiles: bool, quick: bool = False
) -> SuiteReport:
    """Both comparisons on ``device`` (with compiled rows when ``compiles``), as the suite's report."""
    train, val, spec = synthetic_data(sizes, seed)
    metrics = {
        "gpu.pretrain.bare_images_per_s": bare_pretrain(train, spec, sizes, device, seed),
        "gpu.pretrain.ours_images_per_s": our_pretrain(train, val, spec, sizes, device, seed),
        "gpu.embed.bare_images_per_s": bare_embed(train.images, spec, sizes, device, seed),
        "gpu.embed.ours_images_per_s": our_embed(train.images, spec, sizes, device, seed),
    }
    if compiles:
        metrics["gpu.pretrain.compiled_images_per_s"] = our_pretrain(
            train, val, spec, sizes, device, seed, True
        )
        metrics["gpu.embed.compiled_images_per_s"] = our_embed(train.images, spec, sizes, device, seed, True)
    for stage in ("pretrain", "embed"):
        metrics[f"gpu.{stage}.ratio"] = (
            metrics[f"gpu.{stage}.ours_images_per_s"] / metrics[f"gpu.{stage}.bare_images_per_s"]
        )
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    record = {
        "gpu.device": name,
        "gpu.backbone": BACKBONE,
        "gpu.sizes": f"{sizes.image_size} px, {sizes.n_images} images, batch {sizes.batch_size}, "
        f"{sizes.steps} steps",
    }
    return SuiteReport(markdown=_markdown(metrics, record, quick), metrics=metrics, record=record)


def _markdown(metrics: dict[str, float], record: dict[str, str], quick: bool) -> str:
    """The section: one table per comparison, ratios ours / bare (above 1: ours is faster)."""
    lines = [
        "## GPU path",
        "",
        f"{record['gpu.backbone']} on {record['gpu.device']} ({record['gpu.sizes']}); bfloat16 autocast, "
        "channels_last and pinned non-blocking copies in every loop. Images/s, higher is better.",
    ]
    if quick:
        lines += ["", "*Quick run: the numbers mean nothing.*"]
    for stage, title in (("pretrain", "Pretraining"), ("embed", "Evaluation embedding")):
        lines += ["", f"### {title}", "", "| loop | images/s |", "|---|---:|"]
        lines.append(f"| bare PyTorch | {metrics[f'gpu.{stage}.bare_images_per_s']:.0f} |")
        lines.append(f"| fewshot-med | {metrics[f'gpu.{stage}.ours_images_per_s']:.0f} |")
        if f"gpu.{stage}.compiled_images_per_s" in metrics:
            lines.append(
                f"| fewshot-med, torch.compile | {metrics[f'gpu.{stage}.compiled_images_per_s']:.0f} |"
            )
        lines.append(f"| **ratio fewshot-med / bare** | **{metrics[f'gpu.{stage}.ratio']:.2f}** |")
    return "\n".join(lines) + "\n"


def _to_device(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The bare loops' copy: pinned first when bound for CUDA, then non-blocking."""
    return (batch.pin_memory() if device.type == "cuda" else batch).to(device, non_blocking=True)


def _seconds(work: Callable[[], object], times: int, device: torch.device) -> float:
    """Wall seconds of ``times`` calls of ``work``, the device synchronised before and after."""
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(times):
        work()
    _synchronize(device)
    return time.perf_counter() - start


def _images_per_second(
    step: Callable[[], object], warmup: int, steps: int, batch_size: int, device: torch.device
) -> float:
    """Images/s of ``steps`` timed calls of ``step`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        step()
    return steps * batch_size / _seconds(step, steps, device)


def _synchronize(device: torch.device) -> None:
    """Wait for the device's queued kernels (asynchronous on CUDA; nothing elsewhere)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
