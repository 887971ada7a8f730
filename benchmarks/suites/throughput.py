"""Pretraining throughput: fewshot-med's loop against a bare PyTorch loop, in one process.

Same model, data, batch size, optimizer (AdamW with the same parameter groups, learning rate and
weight decay), loss and threads; no augmentation in either, so the comparison isolates loop overhead
(sampling, uint8 -> normalised input, bookkeeping, the logging callback) and the memory layout: the
bare loop feeds PyTorch's default (contiguous NCHW) layout, ours converts model and batches to
channels_last, so a fourth run gives the bare loop channels_last too. Order: one untimed warm-up
step, bare, ours, bare again (drift shows as a difference between the two bare runs), bare
channels_last. Images/s count training steps only (our loop's validation pass is not timed).
Run: ``python -m benchmarks.suites.throughput [--data demo] [--image-size 32]``; ``benchmarks.suites.speed``
runs the same comparison on HAM10000.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fewshot_med.config import PretrainConfig
from fewshot_med.data import ClassSubset, LoadOptions, default_roles, load_dataset, select_classes
from fewshot_med.data.transforms import channel_stats
from fewshot_med.models import BackboneSpec, create_backbone
from fewshot_med.training.pretrain import parameter_groups, pretrain


@dataclass(frozen=True)
class Throughput:
    """Images/s of the four timed runs of ``compare``, in the order they ran."""

    bare_before: float
    ours: float
    bare_after: float
    bare_channels_last: float

    @property
    def bare(self) -> float:
        """Mean images/s of the two bare runs (default layout)."""
        return (self.bare_before + self.bare_after) / 2

    @property
    def ratio(self) -> float:
        """Ours over the mean bare loop (above 1: ours is faster)."""
        return self.ours / self.bare


def loop_settings(batch_size: int, steps: int) -> PretrainConfig:
    """One epoch of ``steps`` steps, no warmup, no augmentation; otherwise the default recipe."""
    return PretrainConfig(
        epochs=1, batch_size=batch_size, steps_per_epoch=steps, augment=False, warmup_epochs=0
    )


def backbone_spec(train: ClassSubset, backbone: str) -> BackboneSpec:
    """The spec the pretrain stage builds: RGB input normalised by the train images' channel stats."""
    mean, std = channel_stats(train.images)
    return BackboneSpec(backbone, 3, int(train.images.shape[1]), mean, std)


def bare_loop(
    train: ClassSubset,
    spec: BackboneSpec,
    settings: PretrainConfig,
    steps: int,
    seed: int = 0,
    channels_last: bool = False,
) -> float:
    """Images/s of the plainest loop: uniform random batches, forward, loss, backward, AdamW step.

    Args:
        train: training images ``(N, H, W, C)`` uint8 (``C == spec.in_chans``) and labels.
        spec: backbone name, image size and normalisation.
        settings: batch size, learning rate, weight decay and label smoothing (as ours uses them).
        steps: timed optimizer steps.
        seed: seeds the model initialisation and the batch sampling.
        channels_last: feed the model and batches in channels_last instead of the default layout.
    """
    if train.images.shape[-1] != spec.in_chans:
        raise ValueError(
            f"bare loop: images have {train.images.shape[-1]} channels, the spec {spec.in_chans}"
        )
    layout = torch.channels_last if channels_last else torch.contiguous_format
    torch.manual_seed(seed)
    model = create_backbone(spec.name, spec.in_chans, spec.image_size).to(memory_format=layout)
    head = nn.Linear(model.num_features, len(train.class_names))
    optimizer = torch.optim.AdamW(parameter_groups([model, head], settings.weight_decay), lr=settings.lr)
    criterion = nn.CrossEntropyLoss(label_smoothing=settings.label_smoothing)
    mean = torch.tensor(spec.mean).view(1, -1, 1, 1)
    std = torch.tensor(spec.std).view(1, -1, 1, 1)
    targets = torch.from_numpy(train.labels.astype(np.int64))
    batch = min(settings.batch_size, len(train))
    rng = np.random.default_rng(seed)
    model.train()
    head.train()
    start = time.perf_counter()
    for _ in range(steps):
        rows = rng.integers(0, len(train), batch)
        images = torch.from_numpy(train.images[rows]).permute(0, 3, 1, 2).float().div_(255)
        images = ((images - mean) / std).contiguous(memory_format=layout)
        loss = criterion(head(model(images)), targets[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return steps * batch / (time.perf_counter() - start)


def our_loop(
    train: ClassSubset,
    val: ClassSubset,
    spec: BackboneSpec,
    settings: PretrainConfig,
    seed: int = 0,
    log_metrics: Callable[[dict[str, float], int], None] | None = None,
) -> float:
    """Images/s of ``fewshot_med.training.pretrain`` (its first epoch's training steps, as it reports)."""
    torch.manual_seed(seed)
    backbone = create_backbone(spec.name, spec.in_chans, spec.image_size)
    result = pretrain(
        backbone, spec, train, val, settings, torch.device("cpu"), log_metrics=log_metrics, seed=seed
    )
    return float(result.history[0]["images_per_second"])


def compare(
    train: ClassSubset, val: ClassSubset, spec: BackboneSpec, batch_size: int, steps: int, seed: int = 0
) -> Throughput:
    """Warm-up step, then bare, ours, bare again and bare channels_last, in this process."""
    settings = loop_settings(batch_size, steps)
    bare_loop(train, spec, settings, 1, seed)  # one-time costs (kernel selection) fall on no timed run
    bare_before = bare_loop(train, spec, settings, steps, seed)
    ours = our_loop(train, val, spec, settings, seed)
    bare_after = bare_loop(train, spec, settings, steps, seed)
    bare_channels_last = bare_loop(train, spec, settings, steps, seed, channels_last=True)
    return Throughput(bare_before, ours, bare_after, bare_channels_last)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default="demo", help="dataset spec with default roles (demo, ham10000, …)")
    parser.add_argument("--backbone", default="resnet10t")
    parser.add_argument("--image-size", type=int, default=32, help="size of the demo images")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    dataset = load_dataset(args.data, LoadOptions(image_size=args.image_size))
    roles = default_roles(args.data)
    if roles is None:
        parser.error(f"dataset '{args.data}' has no default base/novel roles")
    train = select_classes(dataset, "train", roles.base)
    val = select_classes(dataset, "val", roles.base)
    spec = backbone_spec(train, args.backbone)
    result = compare(train, val, spec, args.batch_size, args.steps)
    print(f"data={args.data} backbone={args.backbone} image_size={spec.image_size}", end=" ")
    print(f"batch={args.batch_size} steps={args.steps} threads={args.threads}")
    print(f"bare PyTorch loop:     {result.bare_before:.0f} images/s")
    print(f"fewshot-med loop:      {result.ours:.0f} images/s")
    print(f"bare PyTorch loop:     {result.bare_after:.0f} images/s (again)")
    print(f"bare, channels_last:   {result.bare_channels_last:.0f} images/s")
    print(f"ratio ours / mean bare: {result.ratio:.2f}")


if __name__ == "__main__":
    main()
