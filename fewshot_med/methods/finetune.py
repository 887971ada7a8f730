"""Per-task fine-tuning of a copy of the backbone on the support images, with augmentation."""

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
    require_positive,
)
from fewshot_med.models import autocast

if TYPE_CHECKING:
    from typing_extensions import Self

MODES = ("head", "last_block", "full")


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
    Then ``steps`` full-batch AdamW steps on the cross-entropy of the support set, each on a fresh
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

    Shapes: support ``(n_support, C, H, W)`` normalised float images, query ``(n_query, C, H, W)``,
    logits ``(n_query, n_way)``.

    Args:
        backbone: maps ``(N, C, H, W)`` to ``(N, D)`` (from the ``MethodContext``).
        device: where training and scoring run (from the ``MethodContext``).
        mode: ``head``, ``last_block`` or ``full``.
        steps: optimisation steps.
        lr: AdamW learning rate of the head.
        backbone_lr: AdamW learning rate of the unfrozen backbone parameters.
        scale: logit scale of the cosine head.
        augment: augment the support set afresh at every step.
        train_bn: run the unfrozen backbone layers in train mode (batch statistics).
        batch_size: query images per forward pass when scoring.
        random_state: seed of the augmentation (defaults to the context's seed).

    Attributes:
        backbone_: the fine-tuned copy of the backbone, in eval mode.
        head_: ``nn.Linear(D, n_way)``, the fine-tuned head.
    """

    inputs = "images"
    context_params = ("backbone", "device")

    def __init__(
        self,
        backbone: nn.Module,
        device: torch.device | str,
        mode: str = "head",
        steps: int = 50,
        lr: float = 1e-3,
        backbone_lr: float = 1e-4,
        scale: float = 10.0,
        augment: bool = True,
        train_bn: bool = False,
        batch_size: int = 256,
        random_state: int = 0,
    ) -> None:
        self.backbone = backbone
        self.device = device
        self.mode = mode
        self.steps = steps
        self.lr = lr
        self.backbone_lr = backbone_lr
        self.scale = scale
        self.augment = augment
        self.train_bn = train_bn
        self.batch_size = batch_size
        self.random_state = random_state

    @classmethod
    def from_context(cls, context: MethodContext, **params: Any) -> Self:
        """As ``FewShotMethod.from_context``; ``random_state`` defaults to ``context.seed``."""
        return super().from_context(context, **{"random_state": context.seed, **params})

    def check_params(self) -> None:
        if not isinstance(self.backbone, nn.Module):
            raise ValueError(f"backbone must be a torch module, got {type(self.backbone).__name__}")
        require_choice("mode", self.mode, MODES)
        require_positive("steps", self.steps, integer=True)
        require_positive("lr", self.lr)
        require_positive("backbone_lr", self.backbone_lr)
        require_positive("scale", self.scale)
        require_bool("augment", self.augment)
        require_bool("train_bn", self.train_bn)
        require_positive("batch_size", self.batch_size, integer=True)
        if isinstance(self.random_state, bool) or not isinstance(self.random_state, Integral):
            raise ValueError(f"random_state must be an integer, got {self.random_state!r}")

    @staticmethod
    def _embed(backbone: nn.Module, images: Tensor) -> Tensor:
        """``(n, D)`` L2-normalised float32 features; the backbone runs under autocast."""
        with autocast(images.device):
            features = backbone(images)
        return F.normalize(features.float(), dim=1)

    def _logits(self, backbone: nn.Module, head: nn.Linear, images: Tensor) -> Tensor:
        return self.scale * head(self._embed(backbone, images))

    def _unfreeze(self, backbone: nn.Module) -> list[nn.Parameter]:
        """Set ``requires_grad`` and train/eval mode per ``mode``; return the trainable parameters."""
        backbone.requires_grad_(self.mode == "full").train(self.mode == "full" and self.train_bn)
        if self.mode == "last_block":
            modules = list(backbone.named_modules())
            start = [name for name, _ in modules].index(last_stage(backbone))
            for _, module in modules[start:]:  # the stage, its layers, and every module after it
                module.requires_grad_(True).train(self.train_bn)
        return [p for p in backbone.parameters() if p.requires_grad]

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
            if trainable:
                groups.append({"params": trainable, "lr": self.backbone_lr})
            optimizer = torch.optim.AdamW(groups)
            generator = torch.Generator(device=device).manual_seed(self.random_state)
            for _ in range(self.steps):
                batch = augment_batch(support, generator) if self.augment else support
                loss = F.cross_entropy(self._logits(backbone, head, batch), labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        self.backbone_ = backbone.eval().requires_grad_(False)
        self.head_ = head.requires_grad_(False)

    @torch.inference_mode()
    def _predict_logits(self, query: Tensor) -> Tensor:
        device = torch.device(self.device)
        chunks = [
            self._logits(self.backbone_, self.head_, query[start : start + self.batch_size].to(device))
            for start in range(0, len(query), self.batch_size)
        ]
        return torch.cat(chunks) if chunks else torch.zeros(0, self.n_way_)
