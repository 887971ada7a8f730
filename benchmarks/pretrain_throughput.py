"""Pretraining throughput: fewshot-med's loop against a bare PyTorch loop, in one process.

Same model, data, batch size, optimizer and threads; no augmentation in either, so the comparison
isolates loop overhead (sampling, uint8 -> normalised input, bookkeeping, checkpointing,
MLflow-ready logging callback). Run: ``python -m benchmarks.pretrain_throughput [--image-size 32]``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch import nn

from fewshot_med.config import PretrainConfig
from fewshot_med.data import select_classes
from fewshot_med.data.demo import DEMO_BASE_CLASSES, make_demo_dataset
from fewshot_med.data.transforms import channel_stats, to_model_input
from fewshot_med.models import BackboneSpec, create_backbone


def bare_loop(images: np.ndarray, labels: np.ndarray, spec: BackboneSpec, steps: int, batch: int) -> float:
    """Images/s of the plainest loop: random batches, forward, loss, backward, AdamW step."""
    torch.manual_seed(0)
    model = create_backbone(spec.name, spec.in_chans, spec.image_size)
    head = nn.Linear(model.num_features, int(labels.max()) + 1)
    optimizer = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=1e-3)
    inputs = to_model_input(images, spec.mean, spec.std, spec.in_chans, "cpu")
    targets = torch.from_numpy(labels)
    rng = np.random.default_rng(0)
    model.train()
    start = time.perf_counter()
    for _ in range(steps):
        rows = torch.from_numpy(rng.integers(0, len(labels), batch))
        loss = nn.functional.cross_entropy(head(model(inputs[rows])), targets[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return steps * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backbone", default="resnet10t")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from fewshot_med.training.pretrain import pretrain

    dataset = make_demo_dataset(image_size=args.image_size)
    train = select_classes(dataset, "train", DEMO_BASE_CLASSES)
    val = select_classes(dataset, "val", DEMO_BASE_CLASSES)
    mean, std = channel_stats(train.images)
    spec = BackboneSpec(args.backbone, 3, args.image_size, mean, std)
    settings = PretrainConfig(
        epochs=1, batch_size=args.batch_size, steps_per_epoch=args.steps, augment=False, warmup_epochs=0
    )
    bare = bare_loop(train.images, train.labels, spec, args.steps, args.batch_size)
    torch.manual_seed(0)
    result = pretrain(
        create_backbone(spec.name, 3, args.image_size), spec, train, val, settings, torch.device("cpu")
    )
    ours = result.history[0]["images_per_second"]
    print(f"backbone={args.backbone} image_size={args.image_size} batch={args.batch_size}", end=" ")
    print(f"threads={args.threads}")
    print(f"bare PyTorch loop: {bare:.0f} images/s")
    print(f"fewshot-med loop:  {ours:.0f} images/s  (ratio {ours / bare:.2f})")


if __name__ == "__main__":
    main()
