"""Per-task fine-tuning of a copy of the backbone on the support images, with augmentation, optionally
MAP under a Gaussian prior on the backbone's weights (L2-SP or a SWAG posterior of pretraining), and
optionally Bayesian model averaging over a SWAG posterior of the fine-tuning itself."""

from __future__ import annotations

import copy
from numbers import Integral
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewshot_med.data.transforms import augment_batch
from fewshot_med.methods.base import (
    FewShotMethod,
    MethodContext,
    class_means,
    register_method,
    require_bool,
    require_choice,
    require_non_negative,
    require_positive,
)
from fewshot_med.models import autocast
from fewshot_med.priors import L2SPPrior, SwagCollector, SwagPosterior, SwagPrior

if TYPE_CHECKING:
    from typing_extensions import Self

MODES = ("head", "last_block", "full")
PRIORS = ("none", "l2sp", "swag")
#: The optimisers fine-tuning can take, each from its parameter groups (every group names its lr).
OPTIMIZERS = {
    "adamw": lambda groups: torch.optim.AdamW(groups),
    "sgd": lambda groups: torch.optim.SGD(groups, momentum=0.9),
}
#: Most deviations the downstream SWAG posterior keeps (``K``), Maddox et al.'s rank.
BMA_MAX_RANK = 20


def last_stage(backbone: nn.Module) -> str:
    """Name of the backbone's last stage: timm's last ``feature_info`` module (``layer4`` of a ResNet,
    ``stages.3`` of a ConvNeXt, the last ViT block), else its last top-level child with parameters."""
    info = getattr(backbone, "feature_info", None)
    modules = dict(backbone.named_modules())
    if isinstance(info, list) and info and isinstance(info[-1], dict) and info[-1].get("module") in modules:
        return info[-1]["module"]
    with_params = [name for name, child in backbone.named_children() if any(True for _ in child.parameters())]
    if not with_params:
        raise ValueError(f"finetune: the backbone {type(backbone).__name__} has no parameters to fine-tune")
    return with_params[-1]


@register_method("finetune")
class FineTune(FewShotMethod):
    """Fine-tune a copy of the backbone and a weight-imprinted cosine head on the support images.

    The head is a linear layer on L2-normalised features, initialised by weight imprinting (Qi, Brown
    & Lowe, "Low-Shot Learning with Imprinted Weights", CVPR 2018): row ``c`` is the normalised mean
    of class ``c``'s normalised support features. Logits are ``scale · head(normalise(backbone(x)))``.
    Then ``steps`` full-batch optimiser steps on the cross-entropy of the support set, each on a fresh
    augmentation of it (``augment_batch``: crops, rotations, flips, jitter), as in the transfer
    baselines of Chen, Liu, Kira, Wang & Huang, "A Closer Look at Few-shot Classification", ICLR 2019,
    and Dhillon, Chaudhari, Ravichandran & Soatto, "A Baseline for Few-Shot Image Classification",
    ICLR 2020.

    ``mode`` picks what trains besides the head: ``head`` (nothing), ``last_block`` (the last stage,
    see ``last_stage``, and every layer after it) or ``full`` (everything). With ``train_bn``,
    trained backbone layers run in train mode, so their batch norms use support-batch
    statistics and update their running statistics; without it, or when frozen, layers stay in eval
    mode and keep the pretraining statistics, so head-only fine-tuning sees exactly the features the
    frozen-feature methods see. Support batches are tiny (``n_way * k_shot`` images), and in a quick
    check (resnet10t briefly pretrained on PBC base classes, 3-way, 50 test episodes) eval-mode
    statistics scored 1.5-4.5 accuracy points higher for ``last_block`` and ``full``, hence the
    default ``train_bn=False``; tune it on validation episodes. Queries are scored in eval mode.
    The context backbone is never modified: the method trains a deep copy. Forward passes run
    under ``autocast(device)``.

    ``prior`` puts a Gaussian prior on the trainable backbone parameters θ ``(P,)`` (flattened in
    ``named_parameters()`` order), so fine-tuning finds a MAP estimate; the loss is the support
    cross-entropy (a mean over the ``n`` support images) plus a penalty:

    - ``l2sp``: ``prior_weight/2 · ‖θ - θ₀‖²``, θ₀ the weights fine-tuning starts from (the context
      backbone): L2-SP of Li, Grandvalet & Davoine, "Explicit Inductive Bias for Transfer Learning with
      Convolutional Networks", ICML 2018 (``prior_weight`` is their alpha).
    - ``swag``: ``½(θ - θ̄)ᵀ(prior_scale·Σ)⁻¹(θ - θ̄) / n``, the negative log density (up to a constant)
      of the SWAG posterior of pretraining, N(θ̄, prior_scale·Σ) with Σ = ½·diag(σ²) + ½·DᵀD/(K - 1),
      θ̄ and σ² ``(P,)``, D ``(K, P)`` (``SwagPosterior``, from the context), as the informative
      prior of Shwartz-Ziv, Goldblum, Souri, Kapoor, Zhu, LeCun & Wilson, "Pre-Train Your Loss: Easy
      Bayesian Transfer Learning with Informative Priors", NeurIPS 2022. The division by ``n`` makes it
      a per-image term like the mean cross-entropy, as in their reference implementation (mean
      cross-entropy - log p(θ)/N, N training images). Only the trainable parameters the posterior
      covers (matched by name) get the prior, its marginal on them; ``SwagPrior`` evaluates it
      through the Woodbury identity in ``O(P·K)`` a step. They rescale the covariance by a large
      factor (searching 1e0 … 1e10): tune ``prior_scale`` on validation episodes. The posterior is
      over the pretrained weights, also after meta-training moved the backbone.

    ``optimizer`` is ``adamw`` (the default) or ``sgd``. AdamW's decoupled weight decay (torch's
    default, 0.01) pulls every parameter towards 0, an implicit zero-mean prior; the parameters under a
    prior get none (L2-SP's point is decay towards θ₀, not 0), all others (the head, and backbone
    parameters a SWAG posterior does not cover) keep it. ``prior="none"`` trains exactly as without
    these parameters. Adam's steps are about ``backbone_lr`` whatever the loss scale, so even a very
    strong prior holds the weights within about one step of its mean, and it moves weights the
    cross-entropy leaves alone (at low resolution, e.g. the outer taps of 3x3 kernels on 1x1 maps) by
    up to a step each. ``sgd`` is SGD with momentum 0.9 and no weight decay, the optimiser L2-SP was
    proposed with (Li et al. 2018): its steps scale with the gradient, prior term included, so the
    prior's weight sets how far the weights can move.

    ``bma_samples > 0`` turns on Bayesian model averaging at test time, as Shwartz-Ziv et al. (2022) do
    downstream: fine-tuning also collects the SWAG moments (Maddox, Izmailov, Garipov, Vetrov & Wilson,
    "A Simple Baseline for Bayesian Uncertainty in Deep Learning", NeurIPS 2019) of every trainable
    parameter, the head's and the trainable backbone's, one snapshot after each of the last
    ``bma_snapshots`` steps, keeping the last ``K = min(bma_snapshots, 20)`` deviations (20: Maddox et
    al.'s rank). This changes nothing in training: the MAP weights are the same. Scoring draws
    ``bma_samples`` weight vectors from N(θ̄, bma_scale·Σ), Σ = ½·diag(σ²) + ½·DᵀD/(K - 1) (see
    ``SwagPosterior``; Maddox et al. sample with a factor 0.5), seeded by ``random_state``, and returns
    log(mean over the samples of softmax(``scale · head(normalise(backbone(x)))``)): log-probabilities,
    not logits. Batch norms keep the fine-tuned running statistics (not recomputed per sample). It
    costs ``bma_samples`` forward passes over the queries, and the posterior, ``(K + 2)·P`` floats for
    ``P`` trainable parameters, stays on the fitted method (CPU). ``bma_samples=0`` scores with the
    MAP weights exactly as without these parameters.

    Shapes: support ``(n_support, C, H, W)`` normalised float images, query ``(n_query, C, H, W)``,
    logits ``(n_query, n_way)``.

    Args:
        backbone: maps ``(N, C, H, W)`` to ``(N, D)`` (from the ``MethodContext``).
        device: where training and scoring run (from the ``MethodContext``).
        mode: ``head``, ``last_block`` or ``full``.
        steps: optimisation steps.
        optimizer: ``adamw`` or ``sgd`` (momentum 0.9, no weight decay).
        lr: learning rate of the head.
        backbone_lr: learning rate of the unfrozen backbone parameters.
        scale: logit scale of the cosine head.
        augment: augment the support set afresh at every step.
        train_bn: run the unfrozen backbone layers in train mode (batch statistics).
        batch_size: query images per forward pass when scoring.
        random_state: seed of the augmentation (defaults to the context's seed).
        prior: ``none``, ``l2sp`` or ``swag``, on the trainable backbone parameters (not with
            ``mode="head"``, which trains none).
        prior_weight: the L2-SP weight alpha (≥ 0).
        prior_scale: the SWAG prior's covariance factor (> 0).
        bma_samples: weight samples averaged at test time (≥ 0); 0 scores with the MAP weights.
        bma_snapshots: SWAG snapshots of the downstream posterior, taken after each of the last this-many
            steps (2 … ``steps`` when ``bma_samples > 0``); its rank is ``min(bma_snapshots, 20)``.
        bma_scale: factor of the downstream posterior's covariance when sampling (> 0; 1 samples the
            SWAG posterior as defined, Maddox et al. use 0.5).
        swag: the SWAG posterior of pretraining (from the ``MethodContext``; needed by ``prior="swag"``).

    Attributes:
        backbone_: the fine-tuned copy of the backbone, in eval mode.
        head_: ``nn.Linear(D, n_way)``, the fine-tuned head.
        bma_posterior_: the downstream ``SwagPosterior`` over the trainable parameters, named
            ``backbone.<name>`` and ``head.weight``, ``head.bias`` (``None`` when ``bma_samples=0``).
    """

    inputs = "images"
    context_params = ("backbone", "device")
    optional_context_params = ("swag",)

    def __init__(
        self,
        backbone: nn.Module,
        device: torch.device | str,
        mode: str = "head",
        steps: int = 50,
        optimizer: str = "adamw",
        lr: float = 1e-3,
        backbone_lr: float = 1e-4,
        scale: float = 10.0,
        augment: bool = True,
        train_bn: bool = False,
        batch_size: int = 256,
        random_state: int = 0,
        prior: str = "none",
        prior_weight: float = 0.1,
        prior_scale: float = 1.0,
        bma_samples: int = 0,
        bma_snapshots: int = 10,
        bma_scale: float = 1.0,
        swag: SwagPosterior | None = None,
    ) -> None:
        self.backbone = backbone
        self.device = device
        self.mode = mode
        self.steps = steps
        self.optimizer = optimizer
        self.lr = lr
        self.backbone_lr = backbone_lr
        self.scale = scale
        self.augment = augment
        self.train_bn = train_bn
        self.batch_size = batch_size
        self.random_state = random_state
        self.prior = prior
        self.prior_weight = prior_weight
        self.prior_scale = prior_scale
        self.bma_samples = bma_samples
        self.bma_snapshots = bma_snapshots
        self.bma_scale = bma_scale
        self.swag = swag

    @classmethod
    def from_context(cls, context: MethodContext, **params: Any) -> Self:
        """As ``FewShotMethod.from_context``; ``random_state`` defaults to ``context.seed``."""
        return super().from_context(context, **{"random_state": context.seed, **params})

    def check_params(self) -> None:
        require_choice("mode", self.mode, MODES)
        require_positive("steps", self.steps, integer=True)
        require_choice("optimizer", self.optimizer, tuple(OPTIMIZERS))
        require_positive("lr", self.lr)
        require_positive("backbone_lr", self.backbone_lr)
        require_positive("scale", self.scale)
        require_bool("augment", self.augment)
        require_bool("train_bn", self.train_bn)
        require_positive("batch_size", self.batch_size, integer=True)
        if isinstance(self.random_state, bool) or not isinstance(self.random_state, Integral):
            raise ValueError(f"random_state must be an integer, got {self.random_state!r}")
        require_choice("prior", self.prior, PRIORS)
        require_non_negative("prior_weight", self.prior_weight)
        require_positive("prior_scale", self.prior_scale)
        if (
            isinstance(self.bma_samples, bool)
            or not isinstance(self.bma_samples, Integral)
            or self.bma_samples < 0
        ):
            raise ValueError(f"bma_samples must be an integer ≥ 0, got {self.bma_samples!r}")
        if (
            isinstance(self.bma_snapshots, bool)
            or not isinstance(self.bma_snapshots, Integral)
            or self.bma_snapshots < 2
        ):
            raise ValueError(f"bma_snapshots must be an integer ≥ 2, got {self.bma_snapshots!r}")
        if self.bma_samples > 0 and self.bma_snapshots > self.steps:
            raise ValueError(
                f"bma_snapshots must be at most steps ({self.steps}) when bma_samples > 0, "
                f"got {self.bma_snapshots}"
            )
        require_positive("bma_scale", self.bma_scale)
        if self.prior != "none" and self.mode == "head":
            raise ValueError(
                f"prior '{self.prior}' acts on the trainable backbone parameters and mode 'head' trains "
                "none; use mode last_block or full"
            )

    def check_context(self) -> None:
        if not isinstance(self.backbone, nn.Module):
            raise ValueError(f"backbone must be a torch module, got {type(self.backbone).__name__}")
        if self.prior != "swag":
            return
        if not isinstance(self.swag, SwagPosterior):
            raise ValueError(
                "prior 'swag' needs the SWAG posterior of pretraining, which this run does not have; set "
                "pretrain.swag.enabled: true (or start --from a run that pretrained with it)"
            )
        if not {name for name, _ in self.backbone.named_parameters()} & set(self.swag.names):
            raise ValueError(
                f"the SWAG posterior covers none of the backbone's parameters (it covers "
                f"{', '.join(self.swag.names[:3])}, …): it comes from another architecture"
            )

    def __getstate__(self) -> dict[str, Any]:
        """Pickle (and copy) without the SWAG posterior of pretraining (``(K + 2)·P`` floats, used only by
        ``fit``), so that a fitted method, e.g. in a registered classifier, does not carry it. The
        downstream posterior ``bma_posterior_`` stays: scoring needs it."""
        return {**self.__dict__, "swag": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickle, giving a method pickled before the BMA and optimiser parameters existed (e.g. in a
        classifier registered by an earlier version) their defaults, so it scores with its MAP weights
        as before."""
        self.__dict__.update(
            {
                "bma_samples": 0,
                "bma_snapshots": 10,
                "bma_scale": 1.0,
                "bma_posterior_": None,
                "optimizer": "adamw",
            }
        )
        self.__dict__.update(state)

    @staticmethod
    def _embed(backbone: nn.Module, images: Tensor) -> Tensor:
        """``(n, D)`` L2-normalised float32 features; the backbone runs under autocast."""
        with autocast(images.device):
            features = backbone(images)
        return F.normalize(features.float(), dim=1)

    def _logits(self, backbone: nn.Module, head: nn.Linear, images: Tensor) -> Tensor:
        return self.scale * head(self._embed(backbone, images))

    def _prior(self, params: list[tuple[str, nn.Parameter]]) -> L2SPPrior | SwagPrior | None:
        """The ``prior`` on the named trainable ``params``, bound to them (``None`` without one)."""
        if self.prior == "l2sp":
            return L2SPPrior(params, self.prior_weight)
        if self.prior == "swag":
            assert self.swag is not None  # check_context
            return SwagPrior(self.swag, params, self.prior_scale)
        return None

    def _unfreeze(self, backbone: nn.Module) -> list[tuple[str, nn.Parameter]]:
        """Set ``requires_grad`` and train/eval mode per ``mode``; return the named trainable parameters."""
        backbone.requires_grad_(self.mode == "full").train(self.mode == "full" and self.train_bn)
        if self.mode == "last_block":
            modules = list(backbone.named_modules())
            start = [name for name, _ in modules].index(last_stage(backbone))
            for _, module in modules[start:]:  # the stage, its layers, and every module after it
                module.requires_grad_(True).train(self.train_bn)
        return [(name, p) for name, p in backbone.named_parameters() if p.requires_grad]

    def _fit(self, support: Tensor, labels: Tensor) -> None:
        device = torch.device(self.device)
        # Training needs autograd even when the caller runs under inference_mode; clones of the
        # inputs are ordinary tensors that backward can save.
        with torch.inference_mode(False), torch.enable_grad():
            backbone = copy.deepcopy(self.backbone).to(device).eval()
            if device.type == "cuda":
                backbone.to(memory_format=torch.channels_last)
            support = support.to(device).clone()
            labels = labels.to(device).clone()
            head = nn.Linear(backbone.num_features, self.n_way_, device=device)
            with torch.no_grad():
                prototypes = class_means(self._embed(backbone, support), labels, self.n_way_)
                head.weight.copy_(F.normalize(prototypes, dim=1))
                head.bias.zero_()
            groups = [{"params": list(head.parameters()), "lr": self.lr}]
            trainable = self._unfreeze(backbone)
            prior = self._prior(trainable)
            anchored = set(prior.names) if prior is not None else set()
            # parameters under the prior get no decay towards 0 (see the class docstring)
            for params, decay in (
                ([p for name, p in trainable if name in anchored], {"weight_decay": 0.0}),
                ([p for name, p in trainable if name not in anchored], {}),
            ):
                if params:
                    groups.append({"params": params, "lr": self.backbone_lr, **decay})
            optimizer = OPTIMIZERS[self.optimizer](groups)
            per_image = 1 / len(support) if self.prior == "swag" else 1.0
            generator = torch.Generator(device=device).manual_seed(self.random_state)
            collector = SwagCollector(min(self.bma_snapshots, BMA_MAX_RANK)) if self.bma_samples > 0 else None
            # exactly the trainable parameters: the collector skips those without requires_grad
            trainable_module = nn.ModuleDict({"backbone": backbone, "head": head})
            cached = self._support_features(backbone, support, generator) if self.mode == "head" else None
            for step in range(self.steps):
                if cached is not None:
                    logits = self.scale * head(cached[step % len(cached)])
                else:
                    batch = augment_batch(support, generator) if self.augment else support
                    logits = self._logits(backbone, head, batch)
                loss = F.cross_entropy(logits, labels)
                if prior is not None:
                    loss = loss + per_image * prior.penalty()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if collector is not None and step >= self.steps - self.bma_snapshots:
                    collector.collect(trainable_module)
        self.bma_posterior_ = collector.posterior() if collector is not None else None
        self.backbone_ = backbone.eval().requires_grad_(False)
        self.head_ = head.requires_grad_(False)

    def _support_features(self, backbone: nn.Module, support: Tensor, generator: torch.Generator) -> Tensor:
        """With a frozen backbone (``mode="head"``), the features of every step's support batch, computed
        before training in few large forward passes instead of one small pass per step: ``(steps, n, D)``
        features of the ``steps`` augmentations (drawn in the order training would draw them, so the
        head trains on the same batches), or ``(1, n, D)`` of the support itself without ``augment``.
        The frozen backbone is in eval mode, so a sample's features do not depend on its batch."""
        views = self.steps if self.augment else 1
        per_pass = max(1, self.batch_size // len(support))
        chunks = []
        with torch.no_grad():
            for start in range(0, views, per_pass):
                batches = [
                    augment_batch(support, generator) if self.augment else support
                    for _ in range(min(per_pass, views - start))
                ]
                chunks.append(self._embed(backbone, torch.cat(batches)).view(len(batches), len(support), -1))
        return torch.cat(chunks)

    @torch.inference_mode()
    def _predict_logits(self, query: Tensor) -> Tensor:
        if self.bma_samples > 0:
            return self._predict_bma(query)
        device = torch.device(self.device)
        chunks = [
            self._logits(self.backbone_, self.head_, query[start : start + self.batch_size].to(device))
            for start in range(0, len(query), self.batch_size)
        ]
        return torch.cat(chunks) if chunks else torch.zeros(0, self.n_way_)

    def _predict_bma(self, query: Tensor) -> Tensor:
        """``(n_query, n_way)`` log of the mean softmax over ``bma_samples`` weight vectors drawn from
        ``bma_posterior_``; each is written into ``backbone_`` and ``head_``, whose MAP weights are
        restored afterwards (also on an error)."""
        posterior = self.bma_posterior_
        if posterior is None:
            raise ValueError(
                f"finetune: bma_samples is {self.bma_samples} but the method was fitted with bma_samples=0, "
                "so it has no downstream SWAG posterior; fit it again"
            )
        if len(query) == 0:
            return torch.zeros(0, self.n_way_)
        device = torch.device(self.device)
        params = dict(nn.ModuleDict({"backbone": self.backbone_, "head": self.head_}).named_parameters())
        map_weights = {name: params[name].detach().clone() for name in posterior.names}
        generator = torch.Generator().manual_seed(self.random_state)  # the posterior lives on the CPU
        total = torch.zeros(len(query), self.n_way_, dtype=torch.float64)
        try:
            for _ in range(self.bma_samples):
                sample = posterior.unflatten(posterior.sample(self.bma_scale, generator))
                for name, value in sample.items():
                    params[name].copy_(value)
                for start in range(0, len(query), self.batch_size):
                    logits = self._logits(
                        self.backbone_, self.head_, query[start : start + self.batch_size].to(device)
                    )
                    probs = logits.float().softmax(dim=1).to("cpu", torch.float64)
                    total[start : start + self.batch_size] += probs
        finally:
            for name, value in map_weights.items():
                params[name].copy_(value)
        mean = total / self.bma_samples
        return mean.clamp_min(torch.finfo(torch.float32).tiny).log().float()
