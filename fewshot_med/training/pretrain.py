"""Supervised pretraining of a backbone on the base classes: the features every few-shot method reads.

The quality of these features bounds every method downstream, so the recipe is a full one: a linear
head on the pooled features, AdamW (or Nesterov SGD) without weight decay on norms and biases, a
per-step linear warmup then cosine schedule, label smoothing, class-balanced sampling (HAM10000's
``nv`` is 60% of the base images), batched on-device augmentation and optionally mixup or cutmix
(torchvision's ``MixUp``/``CutMix``, seeded per step so a resumed run mixes the same pairs). Model
selection is by the balanced accuracy on the base classes of the val split, with early stopping, or
the last epoch (``keep="last"``). Optionally, SWAG moments of the backbone's weights are collected
over the last epochs (``settings.swag``): the posterior that serves as an informative prior downstream.
Born-again self-distillation (``settings.born_again_generations``) retrains the starting weights
against the previous generation's predictions.

The loop is lean on purpose: batches are indexed from uint8 arrays on the CPU, moved as uint8 and
normalised/augmented on the device, and losses are accumulated on the device, so the host syncs
once per epoch. Every epoch ends with an atomic checkpoint (the shared ``Harness``) holding everything
needed to continue bit for bit: resuming an interrupted run on the CPU gives exactly the weights of
an uninterrupted one.

Under ``torchrun`` (``fewshot_med.training.distributed``), every rank draws the same epoch order and
takes its contiguous share of each global batch of ``settings.batch_size`` images; DistributedDataParallel
averages the gradients, so the global batch, the schedule and the optimizer steps do not depend on the
number of processes. Batch-norm normalises with each rank's share (its statistics are per rank, as
DDP's default; SyncBatchNorm needs CUDA) and running statistics are rank 0's. Each rank augments its share
with its own generator. Rank 0 validates and tells the others the result.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import balanced_accuracy_score
from torch import nn

from fewshot_med.data.roles import ClassSubset
from fewshot_med.data.transforms import augment_batch, to_model_input
from fewshot_med.errors import FewshotMedError
from fewshot_med.models import BackboneSpec, autocast
from fewshot_med.models.features import compiled
from fewshot_med.priors import SwagCollector, SwagPosterior
from fewshot_med.progress import Progress
from fewshot_med.training import distributed
from fewshot_med.training._harness import Harness, checkpoint_header, cpu_copy

if TYPE_CHECKING:
    from fewshot_med.config import PretrainConfig

CHECKPOINT_KIND = "fewshot_med.pretrain"
CHECKPOINT_VERSION = 1


@dataclass
class PretrainResult:
    """What pretraining hands to the next stage.

    Attributes:
        backbone: the backbone with the weights of the best epoch, in eval mode, on the training device.
        head: ``nn.Linear(D, n_base_classes)`` of the best epoch, same device.
        spec: the backbone's spec (unchanged input).
        history: one dict per finished epoch with ``epoch`` (1-based), ``train_loss`` (label-smoothed,
            mean over steps), ``train_accuracy`` (against the larger label share of a mixed image),
            ``val_loss`` (plain cross-entropy), ``val_accuracy``,
            ``val_balanced_accuracy``, ``lr`` (of the epoch's last step), ``images_per_second`` (training
            steps only) and ``epoch_seconds`` (training and validation).
        best_epoch: 1-based epoch whose weights were kept.
        best_val_balanced_accuracy: val balanced accuracy of that epoch.
        stopped_early: whether early stopping ended training before ``settings.epochs``.
        swag: with ``settings.swag.enabled``, the SWAG posterior over the backbone's trainable
            parameters from the snapshots of the last epochs (see ``snapshot_steps``), whichever
            epoch ``best_epoch`` is; otherwise ``None``.
    """

    backbone: nn.Module
    head: nn.Linear
    spec: BackboneSpec
    history: list[dict[str, float]]
    best_epoch: int
    best_val_balanced_accuracy: float
    stopped_early: bool
    swag: SwagPosterior | None = None


def epoch_indices(labels: np.ndarray, balanced: bool, n: int, generator: np.random.Generator) -> np.ndarray:
    """The training-set rows of one epoch, in the order they are visited.

    Args:
        labels: ``(N,)`` integer class labels of the training set.
        balanced: draw ``n`` rows with replacement, each with probability proportional to the inverse
            frequency of its class, so every class present is drawn equally often in expectation;
            otherwise take the first ``n`` rows of a random permutation (``n <= N``).
        n: rows to return.
        generator: the source of randomness; its state advances.

    Returns:
        ``(n,)`` int64 row indices into ``labels``.
    """
    labels = np.asarray(labels)
    if balanced:
        _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
        weights = 1.0 / counts[inverse]
        return generator.choice(labels.shape[0], size=n, replace=True, p=weights / weights.sum()).astype(
            np.int64
        )
    if n > labels.shape[0]:
        raise ValueError(f"a shuffled epoch has at most {labels.shape[0]} rows, asked for {n}")
    return generator.permutation(labels.shape[0])[:n].astype(np.int64)


def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based).

    Linear warmup from ``1 / warmup_steps`` to 1 over ``warmup_steps`` steps, then constant or a
    cosine decay that reaches 0 after ``total_steps``.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def snapshot_steps(steps: int, per_epoch: int) -> frozenset[int]:
    """The 0-based steps of an epoch after which SWAG snapshots the weights.

    ``per_epoch`` snapshots evenly spaced over ``steps`` steps, the last after the last step: after
    step ``ceil(j * steps / per_epoch) - 1`` for ``j = 1 … per_epoch``; at most one per step.
    """
    return frozenset(math.ceil(j * steps / per_epoch) - 1 for j in range(1, per_epoch + 1))


def parameter_groups(modules: list[nn.Module], weight_decay: float) -> list[dict[str, Any]]:
    """Optimizer groups: weight decay on weight matrices and kernels, none on norms, biases and embeddings.

    One-dimensional parameters (biases, norm scales) and those a timm model lists in
    ``no_weight_decay()`` (ViT position embeddings, class tokens) are not decayed.
    """
    decay, no_decay = [], []
    for module in modules:
        skip = set(module.no_weight_decay()) if hasattr(module, "no_weight_decay") else set()
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            (no_decay if param.ndim <= 1 or name in skip else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def pretrain(
    backbone: nn.Module,
    spec: BackboneSpec,
    train: ClassSubset,
    val: ClassSubset,
    settings: PretrainConfig,
    device: torch.device,
    checkpoint_path: Path | None = None,
    resume: bool = False,
    log_metrics: Callable[[dict[str, float], int], None] | None = None,
    seed: int = 0,
    compile_backbone: bool = False,
) -> PretrainResult:
    """Train ``backbone`` plus a linear head to classify the base classes; keep the best epoch.

    Each epoch draws ``steps`` batches of ``b = min(settings.batch_size, len(train))`` images, where
    ``steps = len(train) // b`` (capped by ``settings.steps_per_epoch``); an incomplete last batch
    is dropped, so batch-norm never sees a tiny batch. Then the base classes of the val split are
    classified (eval mode, no augmentation) and the epoch with the best balanced accuracy is kept. With
    ``settings.keep == "last"`` every epoch replaces the kept weights (so early stopping never stops
    the run) and "best" below means the last epoch. On CUDA, training runs in bfloat16 autocast; on
    CUDA and the CPU, the model and batches are channels_last (the faster layout for convolutions on
    both; about 10% on a 2-core CPU). Progress goes to stderr (``fewshot_med.progress.Progress``).

    With ``settings.swag.enabled``, the backbone's weights are snapshotted into a ``SwagCollector``
    (Maddox et al., NeurIPS 2019) after the ``snapshot_steps`` of every epoch from
    ``settings.swag.first_epoch(epochs)`` on; snapshots only read the weights, so the trajectory is
    the same as without them, and the collector is part of the checkpoint, so a resumed run ends with
    the same moments.

    A pretrained start has three knobs (``optimizer_groups``): ``settings.layer_decay`` lowers the
    learning rate of earlier blocks; ``settings.head_warmup_epochs`` trains the head alone on the
    frozen backbone (eval mode, learning rate 0) before the backbone starts its own warm-up and cosine
    over the remaining steps (LP-FT, Kumar et al., ICLR 2022); ``settings.freeze_bn_stats`` keeps the
    backbone's batch-norm statistics as loaded. All three are off by default.

    With ``settings.born_again_generations = G`` the recipe runs ``G + 1`` times (born-again networks,
    Furlanello et al., ICML 2018; sequential self-distillation for few-shot transfer, Tian et al.,
    ECCV 2020): each later generation starts again from the starting weights, sees the same batches,
    and minimises ``(1 - w) · CE + w · distillation_loss`` against the previous generation's kept
    weights (``w = settings.distill_weight``). The last generation is handed on. Each generation
    checkpoints on its own (``generation_checkpoint``), so a resumed run continues the generation it
    was in; its epochs are logged at steps counted on across generations, with a ``generation`` metric.

    A fresh run seeds torch's global generator with ``seed`` (dropout, drop-path and head
    initialisation); batch sampling and augmentation use their own generators derived from ``seed``.

    Args:
        backbone: maps ``(B, C, H, W)`` to ``(B, D)`` with ``D = backbone.num_features``; trained in place.
        spec: channels, image size and normalisation of the backbone's inputs.
        train: base classes of the train split; images ``(N, H, W, C)`` uint8, labels ``(N,)`` in
            ``0 … n_classes - 1``.
        val: base classes of the val split, same classes in the same label order.
        settings: the recipe (optimizer, schedule, sampling, augmentation, early stopping).
        device: where training runs.
        checkpoint_path: written atomically at the end of every epoch; ``None`` writes nothing.
            ``backbone_from_state(load_checkpoint(path))`` rebuilds the best backbone from it.
        resume: continue from ``checkpoint_path`` if it exists (a finished run is returned as is);
            it must have been written for the same backbone spec, data, settings and seed.
        log_metrics: called once per epoch with ``{"train_loss": …, …}`` and the 1-based epoch.
        seed: seeds the run.
        compile_backbone: run the training steps' forward and backward passes through
            ``torch.compile`` (``runtime.compile``; ``compiled``); checkpoints and the result hold the
            plain backbone.

    Returns:
        The best-epoch backbone and head with the training history (and the SWAG posterior).

    Raises:
        FewshotMedError: unusable inputs, or a checkpoint that does not belong to this run.
    """
    _check_inputs(backbone, train, val)
    backbone.to(device=device, memory_format=_memory_format(device))
    generations = settings.born_again_generations
    start = cpu_copy(backbone.state_dict()) if generations else None
    teacher, history = None, []
    for generation in range(generations + 1):
        torch.manual_seed(seed)
        head = nn.Linear(backbone.num_features, len(train.class_names)).to(device)
        projection = (
            projection_head(backbone.num_features).to(device) if settings.contrastive_weight else None
        )
        loop = _build_loop(
            backbone, head, projection, teacher, len(train), settings, device, seed, compile_backbone
        )
        harness = _harness(
            loop,
            spec,
            train,
            val,
            settings,
            device,
            generation_checkpoint(checkpoint_path, generation, generations),
            _generation_logger(log_metrics, generation, settings.epochs) if generations else log_metrics,
            seed,
        )
        if resume:
            harness.restore()
        if not harness.finished:
            label = f"pretrain generation {generation}" if generations else "pretrain"
            _run_epochs(loop, harness, spec, train, val, settings, device, label)
        harness.load_best()
        history += (
            [{**record, "generation": float(generation)} for record in harness.history]
            if generations
            else harness.history
        )
        if generation < generations:  # this generation teaches a fresh copy of the starting weights
            teacher = frozen_teacher(backbone, head)
            backbone.load_state_dict(start)
    return PretrainResult(
        backbone=backbone,
        head=head,
        spec=spec,
        history=history,
        best_epoch=harness.best_step,
        best_val_balanced_accuracy=float(harness.best_metric),
        stopped_early=harness.stopped_early,
        swag=loop.swag.posterior() if loop.swag is not None else None,
    )


def generation_checkpoint(path: Path | None, generation: int, generations: int) -> Path | None:
    """Where generation ``generation`` of ``generations`` born-again generations checkpoints: the last
    one at ``path`` itself (so ``path`` always holds the weights handed on), each teacher beside it as
    ``<stem>.generation<g><suffix>``."""
    if path is None or generation == generations:
        return path
    path = Path(path)
    return path.with_name(f"{path.stem}.generation{generation}{path.suffix}")


def _generation_logger(
    log_metrics: Callable[[dict[str, float], int], None] | None, generation: int, epochs: int
) -> Callable[[dict[str, float], int], None] | None:
    """``log_metrics`` with generation ``g``'s epochs counted on from the earlier generations'
    (step ``g · epochs + epoch``) and a ``generation`` metric, so one history holds every generation."""
    if log_metrics is None:
        return None
    return lambda metrics, epoch: log_metrics(
        {**metrics, "generation": float(generation)}, generation * epochs + epoch
    )


def frozen_teacher(backbone: nn.Module, head: nn.Linear) -> nn.Module:
    """A frozen copy of ``backbone`` and ``head`` in eval mode: ``(B, C, H, W)`` images ->
    ``(B, n_classes)`` logits for ``distillation_loss``."""
    return nn.Sequential(copy.deepcopy(backbone), copy.deepcopy(head)).eval().requires_grad_(False)


def distillation_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Knowledge distillation (Hinton et al., 2015): ``KL(softmax(t / T) || softmax(s / T)) · T²`` of
    ``(B, n_classes)`` student logits ``s`` against teacher logits ``t``, averaged over the batch; the
    ``T²`` keeps its gradients on the scale of the cross-entropy's."""
    student = F.log_softmax(logits.float() / temperature, dim=1)
    target = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    return F.kl_div(student, target, reduction="batchmean", log_target=True) * temperature**2


#: The optimizer-group key that marks the backbone's groups (their schedule waits for the head warm-up).
BACKBONE_GROUP = "backbone"


@dataclass
class _Loop:
    """What every epoch of one pretraining run reads and advances (see ``_build_loop``)."""

    backbone: nn.Module
    head: nn.Linear
    projection: nn.Module | None
    teacher: nn.Module | None
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    sampler: np.random.Generator
    augment_generator: torch.Generator
    batch_size: int
    steps: int
    swag: SwagCollector | None
    swag_start: int
    swag_steps: frozenset[int]
    mix: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None
    seed: int


#: Width of the contrastive projection's output (SimCLR's 128; Chen et al., ICML 2020).
PROJECTION_DIM = 128


def projection_head(n_features: int) -> nn.Sequential:
    """SimCLR's projection MLP, ``(B, D)`` -> ``(B, PROJECTION_DIM)``: the contrastive loss reads its
    output, so the backbone's features keep what the loss would otherwise discard (Chen et al., 2020)."""
    return nn.Sequential(
        nn.Linear(n_features, n_features), nn.ReLU(inplace=True), nn.Linear(n_features, PROJECTION_DIM)
    )


class _ClassifyAndProject(nn.Module):
    """``(B, C, H, W)`` images -> ``(B, n_classes)`` logits and ``(B, PROJECTION_DIM)`` projections of the
    same features, in one forward pass (one module, so data-parallel wrapping sees every parameter)."""

    def __init__(self, backbone: nn.Module, head: nn.Linear, projection: nn.Module) -> None:
        super().__init__()
        self.backbone, self.head, self.projection = backbone, head, projection

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.backbone(images)
        return self.head(features), self.projection(features)


def contrastive_loss(projections: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent (SimCLR) of ``(2B, P)`` projections whose row ``i`` and row ``B + i`` are two views of one
    image: each view's positive is its twin, the other ``2B - 2`` rows are its negatives
    (pytorch-metric-learning's ``NTXentLoss``)."""
    from pytorch_metric_learning.losses import NTXentLoss

    pairs = torch.arange(len(projections) // 2, device=projections.device).repeat(2)
    return NTXentLoss(temperature=temperature)(projections.float(), pairs)


def mixing_transform(
    kind: str, n_classes: int, alpha: float
) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None:
    """torchvision's batch mixing for ``settings.mixing``: ``(B, C, H, W)`` images and ``(B,)`` labels ->
    mixed images and ``(B, n_classes)`` label proportions; ``None`` for ``"none"``.

    mixup blends whole images (Zhang et al., ICLR 2018); cutmix pastes a box of one image into another
    (Yun et al., ICCV 2019); ``mixup_or_cutmix`` picks one of the two per batch.
    """
    from torchvision.transforms import v2

    mixers = {
        "mixup": lambda: v2.MixUp(alpha=alpha, num_classes=n_classes),
        "cutmix": lambda: v2.CutMix(alpha=alpha, num_classes=n_classes),
        "mixup_or_cutmix": lambda: v2.RandomChoice(
            [v2.MixUp(alpha=alpha, num_classes=n_classes), v2.CutMix(alpha=alpha, num_classes=n_classes)]
        ),
    }
    return mixers[kind]() if kind != "none" else None


def _build_loop(
    backbone: nn.Module,
    head: nn.Linear,
    projection: nn.Module | None,
    teacher: nn.Module | None,
    n_train: int,
    settings: PretrainConfig,
    device: torch.device,
    seed: int,
    compile_backbone: bool,
) -> _Loop:
    """The optimizer, schedule, generators, batch shape and SWAG schedule of a run on ``n_train`` images."""
    optimizer = _make_optimizer(backbone, [head, *([projection] if projection is not None else [])], settings)
    batch_size = min(settings.batch_size, n_train)
    distributed.check_divisible(batch_size, "pretrain.batch_size")
    steps = n_train // batch_size
    if settings.steps_per_epoch is not None:
        steps = min(steps, settings.steps_per_epoch)
    swag_start = settings.swag.first_epoch(settings.epochs)
    swag_steps = snapshot_steps(steps, settings.swag.snapshots_per_epoch)
    if settings.swag.enabled and (settings.epochs - swag_start + 1) * len(swag_steps) < 2:
        raise FewshotMedError(
            f"pretrain: SWAG would take 1 snapshot (epochs {swag_start}-{settings.epochs}, {steps} step(s) "
            "each); it needs 2 or more: set pretrain.swag.start_epoch earlier"
        )
    warmup_steps, total_steps = settings.warmup_epochs * steps, settings.epochs * steps
    frozen_steps = settings.head_warmup_epochs * steps

    def head_factor(step: int) -> float:
        return lr_factor(step, warmup_steps, total_steps, settings.schedule)

    def backbone_factor(step: int) -> float:  # its own warm-up and cosine start after the head's epochs
        if step < frozen_steps:
            return 0.0
        return lr_factor(step - frozen_steps, warmup_steps, total_steps - frozen_steps, settings.schedule)

    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        [backbone_factor if group[BACKBONE_GROUP] else head_factor for group in optimizer.param_groups],
    )
    augment_generator = torch.Generator(device=device)
    world = distributed.world()
    stream = [seed, 1] if world.size == 1 else [seed, 1, world.rank]  # each rank augments its own share
    augment_generator.manual_seed(int(np.random.SeedSequence(stream).generate_state(1)[0]))
    if projection is None:
        joint: nn.Module = nn.Sequential(backbone, head)
    else:
        joint = _ClassifyAndProject(backbone, head, projection)
    model = distributed.wrap(joint, device)
    return _Loop(
        backbone=backbone,
        head=head,
        projection=projection,
        teacher=teacher,
        model=compiled(model, device) if compile_backbone else model,
        optimizer=optimizer,
        scheduler=scheduler,
        sampler=np.random.default_rng(np.random.SeedSequence([seed, 0])),
        augment_generator=augment_generator,
        batch_size=batch_size,
        steps=steps,
        swag=SwagCollector(settings.swag.rank) if settings.swag.enabled else None,
        swag_start=swag_start,
        swag_steps=swag_steps,
        mix=mixing_transform(settings.mixing, head.out_features, settings.mixing_alpha),
        seed=seed,
    )


def _harness(
    loop: _Loop,
    spec: BackboneSpec,
    train: ClassSubset,
    val: ClassSubset,
    settings: PretrainConfig,
    device: torch.device,
    checkpoint_path: Path | None,
    log_metrics: Callable[[dict[str, float], int], None] | None,
    seed: int,
) -> Harness:
    """The run's bookkeeping: checkpoints (with the head's class names), the best epoch by val balanced
    accuracy, early stopping after ``early_stopping_patience`` epochs without improvement."""
    header = checkpoint_header(CHECKPOINT_KIND, CHECKPOINT_VERSION, spec, train, val, settings, seed)
    return Harness(
        what="pretraining",
        header={**header, "class_names": list(train.class_names)},
        path=Path(checkpoint_path) if checkpoint_path is not None else None,
        unit="epoch",
        total=settings.epochs,
        metric="val_balanced_accuracy",
        modules={
            "backbone": loop.backbone,
            "head": loop.head,
            **({"projection": loop.projection} if loop.projection is not None else {}),
        },
        states={"optimizer": loop.optimizer, "scheduler": loop.scheduler, "swag": loop.swag},
        generators={"augment": loop.augment_generator, "numpy_sampler": loop.sampler},
        device=device,
        patience=settings.early_stopping_patience,
        keep_last=settings.keep == "last",
        log_metrics=log_metrics,
    )


def _run_epochs(
    loop: _Loop,
    harness: Harness,
    spec: BackboneSpec,
    train: ClassSubset,
    val: ClassSubset,
    settings: PretrainConfig,
    device: torch.device,
    label: str,
) -> None:
    """Train and validate epoch by epoch from ``harness.done`` until the harness says the run is over;
    progress lines are headed ``label``."""
    with Progress(label, total=settings.epochs, unit="epoch", initial=harness.done) as progress:
        for epoch in range(harness.done, settings.epochs):
            started = time.perf_counter()
            trained = _train_epoch(loop, epoch, spec, train, settings, device, progress)
            distributed.broadcast_buffers(loop.backbone)  # every rank keeps rank 0's running statistics
            scored = distributed.broadcast(
                _validate(loop.backbone, loop.head, spec, val, device, max(256, settings.batch_size))
                if distributed.is_main()
                else None
            )
            seconds = time.perf_counter() - started
            record = {"epoch": float(epoch + 1), **trained, **scored, "epoch_seconds": seconds}
            harness.record(record)
            progress.update(
                epoch + 1, force=True, loss=record["train_loss"], val_bal_acc=record["val_balanced_accuracy"]
            )
            if harness.finished:
                break


def _train_epoch(
    loop: _Loop,
    epoch: int,
    spec: BackboneSpec,
    train: ClassSubset,
    settings: PretrainConfig,
    device: torch.device,
    progress: Progress,
) -> dict[str, float]:
    """One epoch of optimizer steps (0-based ``epoch``): its loss, accuracy, last learning rate and speed
    (images of all ranks per second).

    Losses and hits are accumulated on the device, so the host syncs once, at the end (and the ranks
    sum theirs once).
    """
    backbone, head, optimizer, batch_size = loop.backbone, loop.head, loop.optimizer, loop.batch_size
    backbone.train()
    head.train()
    if epoch < settings.head_warmup_epochs:
        backbone.eval()  # a fixed feature extractor while the head alone trains (its learning rate is 0)
    elif settings.freeze_bn_stats:
        freeze_batch_norm_statistics(backbone)
    started = time.perf_counter()
    labels = train.labels.astype(np.int64)
    rows = epoch_indices(labels, settings.balanced_sampling, loop.steps * batch_size, loop.sampler)
    criterion = nn.CrossEntropyLoss(label_smoothing=settings.label_smoothing)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    lr = optimizer.param_groups[0]["lr"]
    for step in range(loop.steps):
        batch_rows = distributed.share(rows[step * batch_size : (step + 1) * batch_size])
        images = to_model_input(train.images[batch_rows], spec.mean, spec.std, spec.in_chans, device)
        images = images.contiguous(memory_format=_memory_format(device))
        if settings.augment:
            view = augment_batch(images, loop.augment_generator)
            if loop.projection is not None:  # a second view of every image, for the contrastive loss
                view = torch.cat([view, augment_batch(images, loop.augment_generator)])
            images = view
        targets = torch.from_numpy(labels[batch_rows]).to(device, non_blocking=True)
        goals = targets  # class indices, or label proportions after mixing
        if loop.mix is not None:
            with torch.random.fork_rng(devices=[]):  # torchvision draws on the CPU generator
                step_seed = np.random.SeedSequence([loop.seed, 2, epoch, step]).generate_state(1)[0]
                torch.manual_seed(int(step_seed))
                images, goals = loop.mix(images, targets)
        with autocast(device):
            if loop.projection is None:
                logits = loop.model(images)
            else:  # classify the first view; pull each image's two views together
                logits, projections = loop.model(images)
                logits = logits[: len(targets)]
            loss = criterion(logits, goals)
            if loop.teacher is not None:  # born-again: the labels and the previous generation's predictions
                with torch.no_grad():
                    teacher_logits = loop.teacher(images[: len(targets)])
                weight = settings.distill_weight
                distilled = distillation_loss(logits, teacher_logits, settings.distill_temperature)
                loss = (1 - weight) * loss + weight * distilled
            if loop.projection is not None:
                loss = loss + settings.contrastive_weight * contrastive_loss(
                    projections, settings.contrastive_temperature
                )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        lr = optimizer.param_groups[0]["lr"]  # the rate this step used; the epoch reports its last one
        loop.scheduler.step()
        if loop.swag is not None and epoch + 1 >= loop.swag_start and step in loop.swag_steps:
            loop.swag.collect(backbone)
        loss_sum += loss.detach()
        dominant = goals.argmax(dim=1) if goals.ndim == 2 else targets  # the larger share of a mixed image
        correct += (logits.detach().argmax(dim=1) == dominant).sum()
        progress.update(epoch + (step + 1) / loop.steps)
    n_images = loop.steps * batch_size
    size = distributed.world().size
    return {
        "train_loss": distributed.sum_over_ranks(loss_sum).item() / (loop.steps * size),  # the one sync
        "train_accuracy": distributed.sum_over_ranks(correct).item() / n_images,
        "lr": lr,
        "images_per_second": n_images / (time.perf_counter() - started),
    }


@torch.inference_mode()
def _validate(
    backbone: nn.Module,
    head: nn.Linear,
    spec: BackboneSpec,
    val: ClassSubset,
    device: torch.device,
    batch_size: int,
) -> dict[str, float]:
    """Loss (plain cross-entropy), accuracy and balanced accuracy on ``val``, in eval mode."""
    backbone.eval()
    head.eval()
    loss_sum = torch.zeros((), device=device)
    predictions = []
    targets_all = torch.from_numpy(val.labels.astype(np.int64))
    for start in range(0, len(val), batch_size):
        images = to_model_input(
            val.images[start : start + batch_size], spec.mean, spec.std, spec.in_chans, device
        ).contiguous(memory_format=_memory_format(device))
        targets = targets_all[start : start + batch_size].to(device, non_blocking=True)
        with autocast(device):
            logits = head(backbone(images)).float()
        loss_sum += F.cross_entropy(logits, targets, reduction="sum")
        predictions.append(logits.argmax(dim=1))
    predicted = torch.cat(predictions).cpu().numpy()
    truth = targets_all.numpy()
    with warnings.catch_warnings():  # predicted classes absent from a tiny val split
        warnings.simplefilter("ignore", UserWarning)
        balanced = float(balanced_accuracy_score(truth, predicted))
    return {
        "val_loss": loss_sum.item() / len(val),
        "val_accuracy": float((predicted == truth).mean()),
        "val_balanced_accuracy": balanced,
    }


def _check_inputs(backbone: nn.Module, train: ClassSubset, val: ClassSubset) -> None:
    """Refuse inputs the loop cannot train or validate on, with a one-line reason."""
    if not hasattr(backbone, "num_features"):
        raise FewshotMedError("pretrain: the backbone has no num_features; build it with create_backbone")
    if len(train) < 2:
        raise FewshotMedError(
            f"pretrain: the {train.split} split has {len(train)} image(s) of the base classes; "
            "training needs at least 2 (batch-norm statistics)"
        )
    if len(val) == 0:
        raise FewshotMedError(
            f"pretrain: the {val.split} split has no images of the base classes {list(val.class_names)}, "
            "so no epoch can be validated; check the split fractions or the class roles"
        )
    if tuple(val.class_names) != tuple(train.class_names):
        raise FewshotMedError(
            f"pretrain: train classes {list(train.class_names)} and val classes {list(val.class_names)} "
            "differ; select the same base classes from both splits"
        )


def _memory_format(device: torch.device) -> torch.memory_format:
    """channels_last where convolutions run faster in it (CUDA, CPU); contiguous elsewhere (MPS)."""
    return torch.channels_last if device.type in ("cuda", "cpu") else torch.contiguous_format


def freeze_batch_norm_statistics(module: nn.Module) -> None:
    """Put every batch-norm layer of ``module`` in eval mode: its running statistics stop moving and
    normalise the batches, its affine parameters still train (call after ``module.train()``)."""
    for layer in module.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            layer.eval()


def optimizer_groups(
    backbone: nn.Module, heads: list[nn.Module], settings: PretrainConfig
) -> list[dict[str, Any]]:
    """The heads' groups at ``settings.lr``, then the backbone's, each flagged ``BACKBONE_GROUP``.

    Without ``settings.layer_decay`` the backbone also trains at ``settings.lr``. With it, timm's layer
    groups of the backbone (``group_matcher``: stem, then each block) get ``lr · decay^(L - 1 - i)``
    for group ``i`` of ``L``, so the last block trains at ``lr`` and the stem at the smallest rate
    (layer-wise decay, Bao et al., ICLR 2022). Weight decay follows ``parameter_groups`` in both cases.
    """
    from timm.optim import param_groups_layer_decay

    if settings.layer_decay is None:
        backbone_groups = [
            {**group, "lr": settings.lr} for group in parameter_groups([backbone], settings.weight_decay)
        ]
    else:
        skip = backbone.no_weight_decay() if hasattr(backbone, "no_weight_decay") else ()
        layered = param_groups_layer_decay(
            backbone, settings.weight_decay, no_weight_decay_list=skip, layer_decay=settings.layer_decay
        )
        backbone_groups = [
            {
                "params": group["params"],
                "weight_decay": group["weight_decay"],
                "lr": settings.lr * group["lr_scale"],
            }
            for group in layered
        ]
    head_groups = [{**group, "lr": settings.lr} for group in parameter_groups(heads, settings.weight_decay)]
    return [
        {**group, BACKBONE_GROUP: in_backbone}
        for groups, in_backbone in ((head_groups, False), (backbone_groups, True))
        for group in groups
        if group["params"]
    ]


def _make_optimizer(
    backbone: nn.Module, heads: list[nn.Module], settings: PretrainConfig
) -> torch.optim.Optimizer:
    """AdamW, or SGD with Nesterov momentum 0.9, over ``optimizer_groups``."""
    groups = optimizer_groups(backbone, heads, settings)
    if settings.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=settings.lr, momentum=0.9, nesterov=True)
    return torch.optim.AdamW(groups, lr=settings.lr)
