"""Episodic meta-training of a (pretrained) backbone on base-class episodes.

Three algorithms share one loop and differ only in how an episode's outer gradient is computed
(``ALGORITHMS``, keyed by ``MetaTrainConfig.algorithm``); the outer optimizer is always Adam:

- ``protonet``: Prototypical Networks (Snell et al., 2017): queries are classified by the negative
  squared Euclidean distance to the support class means.
- ``anil``: Almost No Inner Loop (Raghu et al., 2020, "Rapid Learning or Feature Reuse?"): the inner
  loop adapts only a zero-initialised linear head on the support features, by differentiable SGD
  steps; the query loss backpropagates through those steps (second order in the head) into the
  backbone. Unlike the paper, the head's initialisation is not meta-learned: episode labels are
  assigned per episode, so it could carry no class information (zeroing it follows Kao et al., 2022).
- ``fomaml``: first-order MAML (Finn et al., 2017; first-order form as in Nichol et al., 2018): the
  inner loop adapts every parameter (backbone and a zero-initialised head, the "zero trick" of Kao
  et al., 2022) on the support set with ``torch.func.functional_call`` and detached fast weights;
  the query-loss gradient at the adapted weights is applied to the original weights.

Batch-norm: every training forward pass runs in train mode, so it normalises with the statistics of
its own batch (protonet and anil: support and query together; fomaml: the support batch during
adaptation and the query batch for the outer loss, as in MAML). Running statistics are updated once
per episode, by that one protonet/anil pass or by fomaml's query pass; fomaml's inner-loop passes
update a throw-away copy of the buffers. The running statistics are what eval-mode validation and
later feature extraction use.

Validation scores a fixed list of novel-class val episodes by nearest-prototype classification of
eval-mode embeddings, for every algorithm (it is the frozen-feature view the methods downstream
read); ANIL also reports its own head adaptation, which is cheap on frozen features. FOMAML's own
adaptation (inner SGD on all weights per episode) is not run at validation: it would cost
``inner_steps`` backward passes per val episode.

Resuming an interrupted run from its checkpoint reproduces the uninterrupted run's weights exactly on
the CPU: the episodes are a pure function of the seed, and the optimizer, the weights and every
random generator are restored.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from tqdm.auto import tqdm

from fewshot_med.config import MetaTrainConfig
from fewshot_med.data.episodes import Episode, sample_episodes
from fewshot_med.data.roles import ClassSubset
from fewshot_med.data.transforms import augment_batch, to_model_input
from fewshot_med.errors import FewshotMedError
from fewshot_med.evaluation.intervals import mean_ci95
from fewshot_med.models import BackboneSpec, autocast, embed, load_checkpoint, save_checkpoint
from fewshot_med.training._resume import (
    check_resumable,
    cpu_copy,
    run_identity,
    set_torch_rng_states,
    torch_rng_states,
)

CHECKPOINT_KIND = "fewshot_med.meta_train"
CHECKPOINT_VERSION = 1
#: novel-class val episodes scored at every validation
VAL_EPISODES = 100
#: settings that do not change the training trajectory, so a resumed run may differ in them


@dataclass(frozen=True)
class EpisodeBatch:
    """One episode on the device: support then query images, normalised (and augmented).

    Attributes:
        images: ``(n_support + n_query, C, H, W)`` float, support rows first.
        labels: ``(n_support + n_query,)`` int64 episode labels in ``0 … n_way - 1``.
        n_support: ``n_way * k_shot``.
        n_way: classes in the episode.
    """

    images: Tensor
    labels: Tensor
    n_support: int
    n_way: int

    @property
    def support(self) -> Tensor:
        """``(n_support, C, H, W)``."""
        return self.images[: self.n_support]

    @property
    def query(self) -> Tensor:
        """``(n_query, C, H, W)``."""
        return self.images[self.n_support :]

    @property
    def support_labels(self) -> Tensor:
        """``(n_support,)``."""
        return self.labels[: self.n_support]

    @property
    def query_labels(self) -> Tensor:
        """``(n_query,)``."""
        return self.labels[self.n_support :]


#: ``step(backbone, batch, settings) -> (loss, accuracy)``: leaves the episode's outer gradient in the
#: ``.grad`` of the backbone's parameters and returns the detached query loss and accuracy (0-dim).
EpisodeStep = Callable[[nn.Module, EpisodeBatch, MetaTrainConfig], tuple[Tensor, Tensor]]
#: ``adapt(support, support_labels, query, n_way, settings) -> (n_query, n_way) logits`` on features.
FeatureAdaptation = Callable[[Tensor, Tensor, Tensor, int, MetaTrainConfig], Tensor]


@dataclass(frozen=True)
class MetaAlgorithm:
    """A meta-training algorithm: its episode step and, if cheap, its own adaptation on frozen features."""

    step: EpisodeStep
    adapt: FeatureAdaptation | None = None


@dataclass
class MetaTrainResult:
    """What meta-training hands to the next stage.

    Attributes:
        backbone: the backbone with the weights of the best validation, in eval mode, on the device.
        history: one dict per validation: ``episode`` (episodes done, 0 = the initial weights),
            ``train_loss``, ``train_accuracy`` (query means since the previous validation; absent at
            episode 0), ``seconds_per_episode`` (same), ``val_accuracy``, ``val_accuracy_ci95`` and, for
            ANIL, ``val_adapted_accuracy`` and ``val_adapted_accuracy_ci95``.
        best_episode: episode whose weights were kept (0: meta-training never beat the initial weights).
        best_val_accuracy: their prototype val accuracy.
    """

    backbone: nn.Module
    history: list[dict[str, float]]
    best_episode: int
    best_val_accuracy: float


def prototype_logits(support: Tensor, support_labels: Tensor, query: Tensor, n_way: int) -> Tensor:
    """Prototypical-network logits (Snell et al., 2017): minus squared distances to class means.

    Args:
        support: ``(n_support, D)`` features.
        support_labels: ``(n_support,)`` int64 in ``0 … n_way - 1``, every class present.
        query: ``(n_query, D)`` features.
        n_way: number of classes.

    Returns:
        ``(n_query, n_way)`` logits ``-||query - prototype||²``.
    """
    one_hot = F.one_hot(support_labels, n_way).to(support.dtype)  # (n_support, n_way)
    prototypes = (one_hot.T @ support) / one_hot.sum(dim=0).unsqueeze(1)  # (n_way, D)
    return -(query.unsqueeze(1) - prototypes.unsqueeze(0)).pow(2).sum(dim=2)


def fit_linear_head(
    features: Tensor, labels: Tensor, n_way: int, steps: int, lr: float, create_graph: bool
) -> tuple[Tensor, Tensor]:
    """ANIL's inner loop (Raghu et al., 2020): SGD on a zero-initialised linear head.

    Args:
        features: ``(n_support, D)`` support features.
        labels: ``(n_support,)`` int64 in ``0 … n_way - 1``.
        n_way: number of classes.
        steps: full-batch SGD steps on the cross-entropy.
        lr: SGD step size.
        create_graph: keep the steps differentiable, so a loss on the adapted head backpropagates
            into ``features`` (second order through the head).

    Returns:
        ``(weight, bias)`` of shapes ``(n_way, D)`` and ``(n_way,)``; logits are
        ``F.linear(x, weight, bias)``.
    """
    with torch.enable_grad():
        weight = features.new_zeros(n_way, features.shape[1], requires_grad=True)
        bias = features.new_zeros(n_way, requires_grad=True)
        for _ in range(steps):
            loss = F.cross_entropy(F.linear(features, weight, bias), labels)
            grad_weight, grad_bias = torch.autograd.grad(loss, (weight, bias), create_graph=create_graph)
            weight, bias = weight - lr * grad_weight, bias - lr * grad_bias
    return weight, bias


def fomaml_adapt(
    backbone: nn.Module, support: Tensor, labels: Tensor, n_way: int, steps: int, lr: float
) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """First-order MAML's inner loop (Finn et al., 2017; Nichol et al., 2018): SGD on all weights.

    The backbone's own parameters are not touched: the steps update detached copies (fast weights,
    leaves without history) through ``torch.func.functional_call``. Batch-norm uses the support
    batch's statistics; its running statistics are updated on a copy, so the module's stay as they were.

    Args:
        backbone: maps ``(B, C, H, W)`` to ``(B, D)``, in train mode.
        support: ``(n_support, C, H, W)`` images.
        labels: ``(n_support,)`` int64 in ``0 … n_way - 1``.
        n_way: classes; the head ``(n_way, D)`` starts at zero.
        steps: full-batch SGD steps on the support cross-entropy.
        lr: SGD step size.

    Returns:
        ``(fast_weights, head_weight, head_bias)``: ``{name: tensor}`` for every trainable backbone
        parameter, and the head, all leaf tensors that require grad.
    """
    fast = {
        name: param.detach().clone().requires_grad_()
        for name, param in backbone.named_parameters()
        if param.requires_grad
    }
    scratch_buffers = {name: buffer.clone() for name, buffer in backbone.named_buffers()}
    weight = support.new_zeros(n_way, backbone.num_features, dtype=torch.float32, requires_grad=True)
    bias = support.new_zeros(n_way, dtype=torch.float32, requires_grad=True)
    leaves = [*fast.values(), weight, bias]
    for _ in range(steps):
        with autocast(support.device):
            features = functional_call(backbone, {**fast, **scratch_buffers}, (support,))
        loss = F.cross_entropy(F.linear(features.float(), weight, bias), labels)
        grads = torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)
        with torch.no_grad():
            for leaf, grad in zip(leaves, grads, strict=True):
                leaf.sub_(grad, alpha=lr)
    return fast, weight, bias


def protonet_step(
    backbone: nn.Module, batch: EpisodeBatch, settings: MetaTrainConfig
) -> tuple[Tensor, Tensor]:
    """Prototypical Networks (Snell et al., 2017): cross-entropy of prototype logits on the queries.

    One forward pass embeds support and query images (``(n_support + n_query, D)``).
    """
    with autocast(batch.images.device):
        features = backbone(batch.images).float()  # (n_support + n_query, D)
    logits = prototype_logits(
        features[: batch.n_support], batch.support_labels, features[batch.n_support :], batch.n_way
    )
    loss = F.cross_entropy(logits, batch.query_labels)
    loss.backward()
    return loss.detach(), _accuracy(logits, batch.query_labels)


def anil_step(backbone: nn.Module, batch: EpisodeBatch, settings: MetaTrainConfig) -> tuple[Tensor, Tensor]:
    """ANIL (Raghu et al., 2020): query loss of the head adapted on the support features.

    One forward pass embeds support and query images (``(n_support + n_query, D)``); the loss is
    differentiated through the inner loop's head steps into the backbone.
    """
    with autocast(batch.images.device):
        features = backbone(batch.images).float()  # (n_support + n_query, D)
    weight, bias = fit_linear_head(
        features[: batch.n_support],
        batch.support_labels,
        batch.n_way,
        settings.inner_steps,
        settings.inner_lr,
        create_graph=True,
    )
    logits = F.linear(features[batch.n_support :], weight, bias)
    loss = F.cross_entropy(logits, batch.query_labels)
    loss.backward()
    return loss.detach(), _accuracy(logits, batch.query_labels)


def fomaml_step(backbone: nn.Module, batch: EpisodeBatch, settings: MetaTrainConfig) -> tuple[Tensor, Tensor]:
    """First-order MAML (Finn et al., 2017; Nichol et al., 2018): query gradient at the adapted weights.

    The gradient of the query loss with respect to the adapted backbone weights is stored as the
    ``.grad`` of the original weights, which this function does not change. The head starts at zero
    in every episode, so its gradient is dropped.
    """
    fast, weight, bias = fomaml_adapt(
        backbone, batch.support, batch.support_labels, batch.n_way, settings.inner_steps, settings.inner_lr
    )
    with autocast(batch.images.device):
        features = functional_call(backbone, fast, (batch.query,))  # module buffers: running stats update
    logits = F.linear(features.float(), weight, bias)
    loss = F.cross_entropy(logits, batch.query_labels)
    grads = torch.autograd.grad(loss, list(fast.values()), allow_unused=True, materialize_grads=True)
    params = dict(backbone.named_parameters())
    for name, grad in zip(fast, grads, strict=True):
        params[name].grad = grad
    return loss.detach(), _accuracy(logits, batch.query_labels)


def anil_adapted_logits(
    support: Tensor, support_labels: Tensor, query: Tensor, n_way: int, settings: MetaTrainConfig
) -> Tensor:
    """ANIL's own few-shot classifier on frozen features: ``(n_query, n_way)`` logits of the adapted head."""
    weight, bias = fit_linear_head(
        support, support_labels, n_way, settings.inner_steps, settings.inner_lr, create_graph=False
    )
    return F.linear(query, weight, bias).detach()


ALGORITHMS: dict[str, MetaAlgorithm] = {
    "protonet": MetaAlgorithm(protonet_step),
    "anil": MetaAlgorithm(anil_step, adapt=anil_adapted_logits),
    "fomaml": MetaAlgorithm(fomaml_step),
}


def meta_train(
    backbone: nn.Module,
    spec: BackboneSpec,
    train_pool: ClassSubset,
    val_pool: ClassSubset,
    settings: MetaTrainConfig,
    device: torch.device,
    checkpoint_path: Path | None = None,
    resume: bool = False,
    log_metrics: Callable[[dict[str, float], int], None] | None = None,
    seed: int = 0,
) -> MetaTrainResult:
    """Meta-train ``backbone`` on base-class episodes; keep the weights with the best val accuracy.

    ``settings.episodes`` episodes of ``n_way`` (all base classes if unset) x (``k_shot`` + ``n_query``)
    images are drawn with ``sample_episodes(train_pool, …, seed=seed)``; each is moved to the device
    as uint8, normalised, augmented when ``settings.augment``, and gives one Adam step at
    ``settings.lr`` (bfloat16 autocast and channels_last on CUDA). The initial weights and then every
    ``val_every`` episodes (and the last) are scored on ``VAL_EPISODES`` fixed episodes of ``val_pool``
    with all its classes, ``min(k_shot, smallest class - 1)`` shots and up to ``n_query`` queries, by
    nearest-prototype accuracy of eval-mode embeddings.

    A fresh run seeds torch's global generator with ``seed`` (dropout, drop-path); augmentation has
    its own generator derived from ``seed``.

    Args:
        backbone: maps ``(B, C, H, W)`` to ``(B, D)`` with ``D = backbone.num_features``; trained in place.
        spec: channels, image size and normalisation of the backbone's inputs.
        train_pool: base classes of the train split; images ``(N, H, W, C)`` uint8.
        val_pool: novel classes of the val split, at least 2.
        settings: algorithm and episode shape (see ``ALGORITHMS``).
        device: where training runs.
        checkpoint_path: written atomically at every validation; ``None`` writes nothing.
            ``backbone_from_state(load_checkpoint(path))`` rebuilds the best backbone from it.
        resume: continue from ``checkpoint_path`` if it exists (a finished run is returned as is); it
            must have been written for the same spec, data, settings and seed.
        log_metrics: called at every validation with ``{"meta_train.val_accuracy": …, …}`` (the history
            keys, plus ``best_val_accuracy``) and the number of episodes done.
        seed: seeds the episodes, the augmentation and (fresh runs) torch.

    Returns:
        The best backbone and the validation history.

    Raises:
        FewshotMedError: unusable inputs (``DataError`` for pools too small for the episode shape), or a
            checkpoint that does not belong to this run.
    """
    algorithm = ALGORITHMS[settings.algorithm]
    n_way = _check_inputs(backbone, train_pool, val_pool, settings)
    identity = run_identity(spec, train_pool, val_pool, settings, seed)
    checkpoint_path = Path(checkpoint_path) if checkpoint_path is not None else None
    if resume and checkpoint_path is None:
        raise FewshotMedError("meta_train: resume=True needs a checkpoint_path to resume from")
    train_episodes = sample_episodes(
        train_pool, n_way, settings.k_shot, settings.n_query, settings.episodes, seed
    ).episodes
    smallest_val_class = int(np.bincount(val_pool.labels, minlength=len(val_pool.class_names)).min())
    val_k_shot = max(1, min(settings.k_shot, smallest_val_class - 1))
    val_episodes = sample_episodes(
        val_pool, len(val_pool.class_names), val_k_shot, settings.n_query, VAL_EPISODES, seed
    ).episodes
    train_positions, val_positions = _position_lookup(train_pool), _position_lookup(val_pool)

    backbone.to(device)
    if device.type == "cuda":
        backbone.to(memory_format=torch.channels_last)
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam([p for p in backbone.parameters() if p.requires_grad], lr=settings.lr)
    augment_generator = torch.Generator(device=device)
    augment_generator.manual_seed(int(np.random.SeedSequence([seed, 1]).generate_state(1)[0]))

    history: list[dict[str, float]] = []
    best: dict[str, Any] = {"episode": 0, "metric": -math.inf, "backbone": None}

    def validate_and_checkpoint(record: dict[str, float]) -> None:
        """Score the val episodes, keep the best weights, checkpoint, report."""
        nonlocal best
        record.update(
            _validate(backbone, spec, val_pool, val_episodes, val_positions, algorithm, settings, device)
        )
        history.append(record)
        if record["val_accuracy"] > best["metric"]:
            best = {"episode": int(record["episode"]), "metric": record["val_accuracy"]}
            best["backbone"] = cpu_copy(backbone.state_dict())
        if checkpoint_path is not None:
            save_checkpoint(
                checkpoint_path,
                {
                    "kind": CHECKPOINT_KIND,
                    "version": CHECKPOINT_VERSION,
                    "identity": identity,
                    "spec": spec.to_dict(),
                    "backbone": best["backbone"],  # best weights, so backbone_from_state() reads them
                    "current": cpu_copy(backbone.state_dict()),
                    "optimizer": optimizer.state_dict(),
                    "rng": torch_rng_states(augment_generator, device),
                    "episode": int(record["episode"]),
                    "history": history,
                    "best_episode": best["episode"],
                    "best_val_accuracy": best["metric"],
                },
            )
        if log_metrics is not None:
            metrics = {f"meta_train.{key}": value for key, value in record.items() if key != "episode"}
            metrics["meta_train.best_val_accuracy"] = best["metric"]
            log_metrics(metrics, int(record["episode"]))

    start = 0
    if resume and checkpoint_path is not None and checkpoint_path.is_file():
        state = load_checkpoint(checkpoint_path)
        check_resumable(
            state, identity, checkpoint_path, CHECKPOINT_KIND, CHECKPOINT_VERSION, "meta-training"
        )
        backbone.load_state_dict(state["current"])
        optimizer.load_state_dict(state["optimizer"])
        set_torch_rng_states(state["rng"], augment_generator, device)
        history.extend(state["history"])
        best = {"episode": state["best_episode"], "metric": state["best_val_accuracy"]}
        best["backbone"] = state["backbone"]
        start = state["episode"]
    else:
        validate_and_checkpoint({"episode": 0.0})

    backbone.train()
    generator = augment_generator if settings.augment else None
    loss_sum = torch.zeros((), device=device)
    correct_sum = torch.zeros((), device=device)
    since, started = 0, time.perf_counter()
    progress = tqdm(
        range(start, settings.episodes),
        desc=f"meta-train ({settings.algorithm})",
        unit="episode",
        initial=start,
        total=settings.episodes,
        disable=True if start == settings.episodes else None,
    )
    for index in progress:
        batch = _episode_batch(train_pool, train_episodes[index], train_positions, spec, device, generator)
        optimizer.zero_grad(set_to_none=True)
        loss, accuracy = algorithm.step(backbone, batch, settings)
        optimizer.step()
        loss_sum += loss
        correct_sum += accuracy
        since += 1
        done = index + 1
        if done % settings.val_every and done != settings.episodes:
            continue
        record = {
            "episode": float(done),
            "train_loss": loss_sum.item() / since,
            "train_accuracy": correct_sum.item() / since,
            "seconds_per_episode": (time.perf_counter() - started) / since,
        }
        validate_and_checkpoint(record)
        progress.set_postfix(
            loss=f"{record['train_loss']:.3f}", val_acc=f"{record['val_accuracy']:.3f}", refresh=False
        )
        loss_sum.zero_()
        correct_sum.zero_()
        since, started = 0, time.perf_counter()
    progress.close()

    backbone.load_state_dict(best["backbone"])
    backbone.eval()
    return MetaTrainResult(
        backbone=backbone,
        history=history,
        best_episode=int(best["episode"]),
        best_val_accuracy=float(best["metric"]),
    )


def _accuracy(logits: Tensor, labels: Tensor) -> Tensor:
    """Detached 0-dim fraction of rows whose arg-max is the label."""
    return (logits.detach().argmax(dim=1) == labels).float().mean()


def _position_lookup(pool: ClassSubset) -> np.ndarray:
    """``lookup[split_row]`` = position of that image in ``pool.images`` (episodes hold split rows)."""
    lookup = np.full(int(pool.indices.max()) + 1, -1, dtype=np.int64)
    lookup[pool.indices] = np.arange(len(pool))
    return lookup


def _episode_batch(
    pool: ClassSubset,
    episode: Episode,
    positions: np.ndarray,
    spec: BackboneSpec,
    device: torch.device,
    generator: torch.Generator | None,
) -> EpisodeBatch:
    """Index an episode's images on the CPU, move them as uint8, normalise (and augment) on ``device``."""
    rows = positions[np.concatenate([episode.support_rows(), episode.query_rows()])]
    images = to_model_input(pool.images[rows], spec.mean, spec.std, spec.in_chans, device)
    if generator is not None:
        images = augment_batch(images, generator)
    labels = np.concatenate([episode.support_labels(), episode.query_labels()])
    return EpisodeBatch(
        images=images,
        labels=torch.from_numpy(labels).to(device, non_blocking=True),
        n_support=sum(len(rows) for rows in episode.support),
        n_way=len(episode.classes),
    )


def _validate(
    backbone: nn.Module,
    spec: BackboneSpec,
    pool: ClassSubset,
    episodes: tuple[Episode, ...],
    positions: np.ndarray,
    algorithm: MetaAlgorithm,
    settings: MetaTrainConfig,
    device: torch.device,
) -> dict[str, float]:
    """Prototype accuracy (and the algorithm's own adaptation, if any) over the val episodes."""
    features = embed(backbone, pool.images, spec, device).clone()  # (N, D); clone: not an inference tensor
    accuracies, adapted = [], []
    for episode in episodes:
        support = features[positions[episode.support_rows()]]
        query = features[positions[episode.query_rows()]]
        support_labels = torch.from_numpy(episode.support_labels())
        query_labels = torch.from_numpy(episode.query_labels())
        n_way = len(episode.classes)
        logits = prototype_logits(support, support_labels, query, n_way)
        accuracies.append(_accuracy(logits, query_labels).item())
        if algorithm.adapt is not None:
            logits = algorithm.adapt(support, support_labels, query, n_way, settings)
            adapted.append(_accuracy(logits, query_labels).item())
    mean, half_width = mean_ci95(accuracies)
    metrics = {"val_accuracy": mean, "val_accuracy_ci95": half_width}
    if adapted:
        metrics["val_adapted_accuracy"], metrics["val_adapted_accuracy_ci95"] = mean_ci95(adapted)
    return metrics


def _check_inputs(
    backbone: nn.Module, train_pool: ClassSubset, val_pool: ClassSubset, settings: MetaTrainConfig
) -> int:
    """Refuse inputs the loop cannot use, with a one-line reason; returns the training ``n_way``."""
    if not hasattr(backbone, "num_features"):
        raise FewshotMedError("meta_train: the backbone has no num_features; build it with create_backbone")
    n_base = len(train_pool.class_names)
    n_way = settings.n_way or n_base
    if not 2 <= n_way <= n_base:
        raise FewshotMedError(
            f"meta_train.n_way={n_way}: episodes need 2 to {n_base} classes (the base classes of "
            f"{train_pool.split}); lower n_way or unset it to use all"
        )
    if len(val_pool.class_names) < 2:
        raise FewshotMedError(
            f"meta_train: validation needs at least 2 novel classes, got {list(val_pool.class_names)}"
        )
    return n_way
