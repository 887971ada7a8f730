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

The ProtoNet and ANIL maths is the few-shot methods' own (``fewshot_med.methods``: ``class_means``,
``prototype_logits``, ``fit_linear_head``, ``head_logits``), called here on features that carry the
backbone's graph, so each episode loss is differentiated with respect to the backbone's weights.

Validation scores a fixed list of novel-class val episodes with the ``ProtoNet`` method on eval-mode
embeddings, for every algorithm (it is the frozen-feature view the methods downstream read); ANIL
also reports the ``ANIL`` method, its own head adaptation, which is cheap on frozen features. FOMAML's own
adaptation (inner SGD on all weights per episode) is not run at validation: it would cost
``inner_steps`` backward passes per val episode.

Adversarial querying (Goldblum, Fowl & Goldstein, "Adversarially Robust Few-Shot Learning: A
Meta-Learning Approach", NeurIPS 2020), with ``meta_train.adversarial``: each episode's query images
are replaced by L∞ PGD perturbations (Madry et al., ICLR 2018; ``fewshot_med.robustness.attacks.pgd``)
against the episode's adapted model, and the algorithm's step then runs on the clean support set and
the perturbed queries. The adapted model (``MetaAlgorithm.episode_model``) is the one the step's loss
uses, at the current weights: prototypes (ProtoNet) or the inner-loop head (ANIL) of the clean
support features, with support and query embedded in one train-mode pass as in the step; FOMAML's
adapted weights and head (its inner loop then runs twice per episode: for the attack and in the step).
The attack sees no weight gradient and leaves the running statistics alone. It acts on ``[0, 1]``
pixels: the episode batch is normalised and augmented first, its queries are mapped back to pixels
(``input_pixels``, clamped to ``[0, 1]``), perturbed within ε of those, and normalised again.

Each Adam step averages the outer gradients of ``episodes_per_step`` consecutive episodes (one by
default). Under ``torchrun`` (``fewshot_med.training.distributed``) the ranks share each step's episodes
(rank ``r`` takes the ``r``-th of every ``n``) and average their gradients in one all-reduce, so the
episodes, their grouping into steps and the number of steps do not depend on the number of processes.
Running statistics are rank 0's (broadcast before each validation); rank 0 validates and tells the
others the result. Each rank augments (and attacks) with its own generators.

Checkpoints, the best weights and resuming are the shared ``Harness``'s. Resuming an interrupted run
from its checkpoint reproduces the uninterrupted run's weights exactly on the CPU: the episodes are a
pure function of the seed, and the optimizer, the weights and every random generator are restored.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from fewshot_med.data.episodes import Episode, sample_episodes
from fewshot_med.data.roles import ClassSubset
from fewshot_med.data.transforms import augment_batch, to_model_input
from fewshot_med.errors import FewshotMedError
from fewshot_med.evaluation.intervals import mean_ci95
from fewshot_med.methods.anil import ANIL, fit_linear_head, head_logits
from fewshot_med.methods.base import FewShotMethod, class_means
from fewshot_med.methods.protonet import ProtoNet, prototype_logits
from fewshot_med.models import BackboneSpec, autocast, embed
from fewshot_med.models.features import compiled
from fewshot_med.progress import Progress
from fewshot_med.training import distributed
from fewshot_med.training._harness import Harness, checkpoint_header
from fewshot_med.training.adversarial import (
    PixelModel,
    check_pixel_space,
    frozen_call,
    input_pixels,
    model_input,
)

if TYPE_CHECKING:
    from fewshot_med.config import MetaTrainConfig

CHECKPOINT_KIND = "fewshot_med.meta_train"
#: 2: the shared ``Harness`` layout (``current`` by module name, ``best_metric``, ``finished``)
CHECKPOINT_VERSION = 2
#: novel-class val episodes scored at every validation
VAL_EPISODES = 100


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
EpisodeStep = Callable[[nn.Module, "EpisodeBatch", "MetaTrainConfig"], tuple[Tensor, Tensor]]
#: ``episode_model(backbone, batch, settings) -> logits``: the episode's model adapted on its clean
#: support set, a function of normalised queries ``(n_query, C, H, W)`` -> ``(n_query, n_way)`` logits
#: at the backbone's current weights, detached, leaving its running statistics alone: what adversarial
#: querying attacks.
EpisodeModel = Callable[[nn.Module, "EpisodeBatch", "MetaTrainConfig"], Callable[[Tensor], Tensor]]


@dataclass(frozen=True)
class MetaAlgorithm:
    """A meta-training algorithm: its episode step, the adapted model its step's loss uses (attacked by
    adversarial querying) and, if cheap, its own few-shot method on frozen features, which validation
    also scores (``adapted(settings)`` builds it, unfitted)."""

    step: EpisodeStep
    episode_model: EpisodeModel
    adapted: Callable[[MetaTrainConfig], FewShotMethod] | None = None


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
    """Prototypical Networks (Snell et al., 2017): query loss of the negative squared distances to the
    support class means, from one forward pass over support and query images."""
    support, query = _episode_features(backbone, batch)
    prototypes = class_means(support, batch.support_labels.unsqueeze(0), batch.n_way)  # (1, n_way, D)
    return _query_loss_backward(prototype_logits(query, prototypes)[0], batch.query_labels)


def anil_step(backbone: nn.Module, batch: EpisodeBatch, settings: MetaTrainConfig) -> tuple[Tensor, Tensor]:
    """ANIL (Raghu et al., 2020): query loss of the head adapted on the support features.

    One forward pass embeds support and query images; the loss is differentiated through the inner
    loop's head steps (``fit_linear_head``, second order in the head) into the backbone.
    """
    support, query = _episode_features(backbone, batch)
    labels = batch.support_labels.unsqueeze(0)
    weight, bias = fit_linear_head(support, labels, batch.n_way, settings.inner_steps, settings.inner_lr)
    return _query_loss_backward(head_logits(query, weight, bias)[0], batch.query_labels)


def fomaml_step(backbone: nn.Module, batch: EpisodeBatch, settings: MetaTrainConfig) -> tuple[Tensor, Tensor]:
    """First-order MAML (Finn et al., 2017; Nichol et al., 2018): query gradient at the adapted weights.

    The gradient of the query loss with respect to the adapted backbone weights is added to the
    ``.grad`` of the original weights (as ``backward`` would), which this function does not change. The
    head starts at zero in every episode, so its gradient is dropped.
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
        param = params[name]
        param.grad = grad if param.grad is None else param.grad + grad
    return loss.detach(), _accuracy(logits, batch.query_labels)


def protonet_model(
    backbone: nn.Module, batch: EpisodeBatch, settings: MetaTrainConfig
) -> Callable[[Tensor], Tensor]:
    """ProtoNet's adapted model: the queries' negative squared distances to the prototypes of the
    clean support features, support and query embedded in one pass as in ``protonet_step``."""
    forward = frozen_call(backbone)
    with torch.no_grad():
        support, _ = _joint_features(forward, batch.support, batch.query)
    prototypes = class_means(support, batch.support_labels.unsqueeze(0), batch.n_way)  # (1, n_way, D)
    return lambda query: prototype_logits(_joint_features(forward, batch.support, query)[1], prototypes)[0]


def anil_model(
    backbone: nn.Module, batch: EpisodeBatch, settings: MetaTrainConfig
) -> Callable[[Tensor], Tensor]:
    """ANIL's adapted model: the inner-loop head of the clean support features on the queries' features,
    support and query embedded in one pass as in ``anil_step``."""
    forward = frozen_call(backbone)
    with torch.no_grad():
        support, _ = _joint_features(forward, batch.support, batch.query)
        labels = batch.support_labels.unsqueeze(0)
        weight, bias = fit_linear_head(support, labels, batch.n_way, settings.inner_steps, settings.inner_lr)
    return lambda query: head_logits(_joint_features(forward, batch.support, query)[1], weight, bias)[0]


def fomaml_model(
    backbone: nn.Module, batch: EpisodeBatch, settings: MetaTrainConfig
) -> Callable[[Tensor], Tensor]:
    """FOMAML's adapted model: the inner loop's weights and head on the clean support set, the queries
    in a batch of their own as in ``fomaml_step``."""
    fast, weight, bias = fomaml_adapt(
        backbone, batch.support, batch.support_labels, batch.n_way, settings.inner_steps, settings.inner_lr
    )
    weights = {name: tensor.detach() for name, tensor in fast.items()}
    weights |= {name: buffer.clone() for name, buffer in backbone.named_buffers()}
    weight, bias = weight.detach(), bias.detach()

    def logits(query: Tensor) -> Tensor:
        with autocast(query.device):
            features = functional_call(backbone, weights, (query,))
        return F.linear(features.float(), weight, bias)

    return logits


def adversarial_querying_step(
    algorithm: MetaAlgorithm,
    spec: BackboneSpec,
    generator: torch.Generator,
    backbone: nn.Module,
    batch: EpisodeBatch,
    settings: MetaTrainConfig,
) -> tuple[Tensor, Tensor]:
    """Adversarial querying (Goldblum, Fowl & Goldstein, NeurIPS 2020): ``algorithm``'s step on the
    episode with its queries replaced by L∞ PGD perturbations against its adapted model.

    The queries ``(n_query, C, H, W)`` are mapped to ``[0, 1]`` pixels, attacked through
    ``PixelModel(algorithm.episode_model(...))`` with ``settings.adversarial`` (the random start seeded
    from ``generator``), normalised again, and put back behind the clean support rows.
    """
    from fewshot_med.robustness.attacks import pgd  # ART takes seconds to import; configs import this module

    attack = settings.adversarial
    model = PixelModel(algorithm.episode_model(backbone, batch, settings), spec, batch.n_way)
    seed = int(torch.randint(0, 2**31 - 1, (), generator=generator, device=generator.device))
    clean = input_pixels(batch.query, spec)
    query = pgd(model, clean, batch.query_labels, attack.epsilon, attack.steps, attack.step_size, seed=seed)
    images = torch.cat([batch.support, model_input(query, spec).to(batch.images.dtype)])
    return algorithm.step(backbone, dataclasses.replace(batch, images=images), settings)


def _anil_method(settings: MetaTrainConfig) -> FewShotMethod:
    """ANIL's own test-time adaptation with the meta-training inner loop's steps and step size."""
    return ANIL(steps=settings.inner_steps, lr=settings.inner_lr)


ALGORITHMS: dict[str, MetaAlgorithm] = {
    "protonet": MetaAlgorithm(protonet_step, protonet_model),
    "anil": MetaAlgorithm(anil_step, anil_model, adapted=_anil_method),
    "fomaml": MetaAlgorithm(fomaml_step, fomaml_model),
}
#: algorithms whose step calls the backbone module itself, so ``runtime.compile`` can run it compiled
#: (FOMAML's ``functional_call``, and adversarial querying's, swap the weights of the plain module)
COMPILED_ALGORITHMS = frozenset({"protonet", "anil"})


def _through(forward: nn.Module, step: EpisodeStep) -> EpisodeStep:
    """``step`` with the backbone's forward passes run by ``forward``, its ``compiled`` wrapper, which
    shares its parameters: the gradients land on the backbone."""
    return lambda backbone, batch, settings: step(forward, batch, settings)


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
    compile_backbone: bool = False,
) -> MetaTrainResult:
    """Meta-train ``backbone`` on base-class episodes; keep the weights with the best val accuracy.

    ``settings.episodes`` episodes of ``n_way`` (all base classes if unset) x (``k_shot`` + ``n_query``)
    images are drawn with ``sample_episodes(train_pool, …, seed=seed)``; each is moved to the device
    as uint8, normalised, augmented when ``settings.augment``, and gives one Adam step at
    ``settings.lr`` (bfloat16 autocast and channels_last on CUDA). The initial weights and then every
    ``val_every`` episodes (and the last) are scored on ``VAL_EPISODES`` fixed episodes of ``val_pool``
    with all its classes, ``min(k_shot, smallest class - 1)`` shots and up to ``n_query`` queries, by
    nearest-prototype accuracy of eval-mode embeddings. With ``settings.adversarial`` every episode's
    queries are perturbed first (``adversarial_querying_step``); validation stays clean.

    A fresh run seeds torch's global generator with ``seed`` (dropout, drop-path); augmentation and the
    attacks' random starts have their own generators derived from ``seed``.

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
        log_metrics: called at every validation with ``{"val_accuracy": …, …}`` (the history
            keys, plus ``best_val_accuracy``) and the number of episodes done.
        seed: seeds the episodes, the augmentation and (fresh runs) torch.
        compile_backbone: run the episode steps' forward passes through ``torch.compile``
            (``runtime.compile``; ``COMPILED_ALGORITHMS`` without adversarial querying, else ignored).

    Returns:
        The best backbone (the last with ``settings.keep == "last"``) and the validation history.

    Raises:
        FewshotMedError: unusable inputs (``DataError`` for pools too small for the episode shape), or a
            checkpoint that does not belong to this run.
    """
    algorithm = ALGORITHMS[settings.algorithm]
    n_way = _check_inputs(backbone, spec, train_pool, val_pool, settings)
    train_episodes = sample_episodes(
        train_pool, n_way, settings.k_shot, settings.n_query, settings.episodes, seed
    ).episodes
    distributed.check_divisible(settings.episodes_per_step, "meta_train.episodes_per_step")
    validate = _validation(backbone, spec, val_pool, algorithm, settings, device, seed)
    harness, optimizer, generators = _start(
        backbone, spec, train_pool, val_pool, settings, device, checkpoint_path, log_metrics, seed
    )
    if not (resume and harness.restore()):
        harness.record({"episode": 0.0, **validate()})
    generator, positions = generators["augment"] if settings.augment else None, _position_lookup(train_pool)
    batch = functools.partial(_episode_batch, train_pool, positions, spec, device, generator)
    step = algorithm.step
    if settings.adversarial is not None:
        step = functools.partial(adversarial_querying_step, algorithm, spec, generators["attack"])
    elif compile_backbone and settings.algorithm in COMPILED_ALGORITHMS:
        step = _through(compiled(backbone, device), step)
    if not harness.finished:
        _run_episodes(backbone, optimizer, harness, step, train_episodes, batch, validate, settings)
    harness.load_best()
    return MetaTrainResult(
        backbone=backbone,
        history=harness.history,
        best_episode=harness.best_step,
        best_val_accuracy=float(harness.best_metric),
    )


def _start(
    backbone: nn.Module,
    spec: BackboneSpec,
    train_pool: ClassSubset,
    val_pool: ClassSubset,
    settings: MetaTrainConfig,
    device: torch.device,
    checkpoint_path: Path | None,
    log_metrics: Callable[[dict[str, float], int], None] | None,
    seed: int,
) -> tuple[Harness, torch.optim.Optimizer, dict[str, torch.Generator]]:
    """Put the backbone on the device, seed torch; the run's harness, Adam optimizer and generators
    (``augment``, ``attack``). The harness keeps the weights of the best val accuracy (or the last, with
    ``settings.keep == "last"``) and never stops early."""
    backbone.to(device)
    if device.type == "cuda":
        backbone.to(memory_format=torch.channels_last)
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam([p for p in backbone.parameters() if p.requires_grad], lr=settings.lr)
    generators = {}
    world = distributed.world()
    for stream, name in enumerate(("augment", "attack"), start=1):
        entropy = [seed, stream] if world.size == 1 else [seed, stream, world.rank]  # one stream per rank
        generators[name] = torch.Generator(device=device)
        generators[name].manual_seed(int(np.random.SeedSequence(entropy).generate_state(1)[0]))
    harness = Harness(
        what="meta-training",
        header=checkpoint_header(
            CHECKPOINT_KIND, CHECKPOINT_VERSION, spec, train_pool, val_pool, settings, seed
        ),
        path=Path(checkpoint_path) if checkpoint_path is not None else None,
        unit="episode",
        total=settings.episodes,
        metric="val_accuracy",
        modules={"backbone": backbone},
        states={"optimizer": optimizer},
        generators=generators,
        device=device,
        log_metrics=log_metrics,
        keep_last=settings.keep == "last",
    )
    return harness, optimizer, generators


def _run_episodes(
    backbone: nn.Module,
    optimizer: torch.optim.Optimizer,
    harness: Harness,
    step: EpisodeStep,
    episodes: tuple[Episode, ...],
    batch: Callable[[Episode], EpisodeBatch],
    validate: Callable[[], dict[str, float]],
    settings: MetaTrainConfig,
) -> None:
    """Train from episode ``harness.done`` on, validating every ``val_every`` episodes and after the last.

    Each optimizer step takes ``episodes_per_step`` episodes, this rank's share of them (see the module
    docstring); their gradients are averaged. Query losses and accuracies are accumulated on the device,
    so the host syncs (and the ranks sum them) once per validation.
    """
    name, total = f"meta-train ({settings.algorithm})", settings.episodes
    per_step = settings.episodes_per_step
    world = distributed.world()
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    with Progress(name, total=total, unit="episode", initial=harness.done) as progress:
        for first in range(harness.done, total, settings.val_every):
            last = min(first + settings.val_every, total)
            backbone.train()
            started = time.perf_counter()
            loss_sum = correct_sum = torch.zeros((), device=harness.device)
            for step_first in range(first, last, per_step):
                optimizer.zero_grad(set_to_none=True)
                mine = range(step_first + world.rank, step_first + per_step, world.size)
                for index in mine:
                    loss, accuracy = step(backbone, batch(episodes[index]), settings)
                    loss_sum, correct_sum = loss_sum + loss, correct_sum + accuracy
                if len(mine) > 1:
                    for param in parameters:
                        if param.grad is not None:
                            param.grad /= len(mine)
                distributed.average_gradients(parameters)
                optimizer.step()
                progress.update(step_first + per_step)
            distributed.broadcast_buffers(backbone)  # every rank keeps rank 0's running statistics
            record = {
                "episode": float(last),
                "train_loss": distributed.sum_over_ranks(loss_sum).item() / (last - first),
                "train_accuracy": distributed.sum_over_ranks(correct_sum).item() / (last - first),
                "seconds_per_episode": (time.perf_counter() - started) / (last - first),
                **validate(),
            }
            harness.record(record)
            progress.update(last, force=True, loss=record["train_loss"], val_acc=record["val_accuracy"])


def _episode_features(backbone: nn.Module, batch: EpisodeBatch) -> tuple[Tensor, Tensor]:
    """Support ``(1, n_support, D)`` and query ``(1, n_query, D)`` float32 features of one episode, from
    one forward pass (one batch for batch-norm), in the methods' layout of one episode."""
    with autocast(batch.images.device):
        features = backbone(batch.images).float().unsqueeze(0)  # (1, n_support + n_query, D)
    return features[:, : batch.n_support], features[:, batch.n_support :]


def _joint_features(
    forward: Callable[[Tensor], Tensor], support: Tensor, query: Tensor
) -> tuple[Tensor, Tensor]:
    """Support ``(1, n_support, D)`` and query ``(1, n_query, D)`` float32 features from one ``forward``
    pass over the support then the query images (one batch for batch-norm, as ``_episode_features``)."""
    with autocast(query.device):
        features = forward(torch.cat([support, query])).float().unsqueeze(0)
    return features[:, : support.shape[0]], features[:, support.shape[0] :]


def _query_loss_backward(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Backpropagate the query cross-entropy of ``(n_query, n_way)`` logits; its detached value and the
    query accuracy (0-dim)."""
    loss = F.cross_entropy(logits, labels)
    loss.backward()
    return loss.detach(), _accuracy(logits, labels)


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
    positions: np.ndarray,
    spec: BackboneSpec,
    device: torch.device,
    generator: torch.Generator | None,
    episode: Episode,
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


def _validation(
    backbone: nn.Module,
    spec: BackboneSpec,
    pool: ClassSubset,
    algorithm: MetaAlgorithm,
    settings: MetaTrainConfig,
    device: torch.device,
    seed: int,
) -> Callable[[], dict[str, float]]:
    """The validation of a run: ``VAL_EPISODES`` fixed episodes of all ``pool`` classes, with
    ``min(k_shot, smallest class - 1)`` shots and up to ``n_query`` queries, scored by ``ProtoNet``
    (``val_accuracy``) and the algorithm's own method, if any (``val_adapted_accuracy``). Under
    ``torchrun``, rank 0 scores and every rank gets its scores."""
    smallest_class = int(np.bincount(pool.labels, minlength=len(pool.class_names)).min())
    k_shot = max(1, min(settings.k_shot, smallest_class - 1))
    episodes = sample_episodes(pool, len(pool.class_names), k_shot, settings.n_query, VAL_EPISODES, seed)
    methods = {"val_accuracy": ProtoNet()}
    if algorithm.adapted is not None:
        methods["val_adapted_accuracy"] = algorithm.adapted(settings)
    score = functools.partial(
        _validate, backbone, spec, pool, episodes.episodes, _position_lookup(pool), methods, device
    )
    return lambda: distributed.broadcast(score() if distributed.is_main() else None)


@torch.inference_mode()
def _validate(
    backbone: nn.Module,
    spec: BackboneSpec,
    pool: ClassSubset,
    episodes: tuple[Episode, ...],
    positions: np.ndarray,
    methods: dict[str, FewShotMethod],
    device: torch.device,
) -> dict[str, float]:
    """Mean query accuracy (and its 95% CI half-width) of each method over the episodes, on eval-mode
    embeddings: ``{key: mean, f"{key}_ci95": half_width}`` for every ``methods`` key."""
    features = embed(backbone, pool.images, spec, device)  # (N, D)
    accuracies: dict[str, list[float]] = {key: [] for key in methods}
    for episode in episodes:
        support = features[positions[episode.support_rows()]]
        query = features[positions[episode.query_rows()]]
        support_labels = torch.from_numpy(episode.support_labels())
        query_labels = torch.from_numpy(episode.query_labels())
        for key, method in methods.items():
            logits = method.fit(support, support_labels).predict_logits(query)
            accuracies[key].append(_accuracy(logits, query_labels).item())
    metrics: dict[str, float] = {}
    for key, values in accuracies.items():
        metrics[key], metrics[f"{key}_ci95"] = mean_ci95(values)
    return metrics


def _check_inputs(
    backbone: nn.Module,
    spec: BackboneSpec,
    train_pool: ClassSubset,
    val_pool: ClassSubset,
    settings: MetaTrainConfig,
) -> int:
    """Refuse inputs the loop cannot use, with a one-line reason; returns the training ``n_way``."""
    if not hasattr(backbone, "num_features"):
        raise FewshotMedError("meta_train: the backbone has no num_features; build it with create_backbone")
    if settings.adversarial is not None:
        check_pixel_space(spec, "meta_train.adversarial")
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
