"""Adversarial training in pixel space: the [0, 1] <-> model-input maps, and PGD adversarial fine-tuning.

Attacks (``fewshot_med.robustness.attacks.pgd``) act on images in ``[0, 1]`` *before* normalisation,
so the L∞ budget is in grey levels. The training loops normalise first and augment the normalised
batch (``to_model_input`` then ``augment_batch``); ``input_pixels`` maps such a batch back to ``[0, 1]``
pixels (clamped: brightness and contrast jitter may leave the range), the attack perturbs those, and
``model_input`` normalises the result again, differentiably.

``adversarial_finetune`` is supervised PGD adversarial training (Madry, Makelov, Schmidt, Tsipras &
Vladu, "Towards Deep Learning Models Resistant to Adversarial Attacks", ICLR 2018) of a backbone on the
base classes: the robust-transfer baseline beside adversarial querying (``meta_train.adversarial``).

The attack library (ART) takes seconds to import, and ``fewshot_med.training.meta`` is imported when a
config is validated, so ``pgd`` is imported where it is called.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from fewshot_med.data.roles import ClassSubset
from fewshot_med.data.transforms import augment_batch, to_model_input
from fewshot_med.errors import FewshotMedError
from fewshot_med.methods.base import class_means
from fewshot_med.models import BackboneSpec, autocast, embed
from fewshot_med.robustness.adapted import model_input

if TYPE_CHECKING:
    from fewshot_med.config import AdversarialConfig


def check_pixel_space(spec: BackboneSpec, what: str) -> None:
    """Refuse a backbone whose inputs have no ``[0, 1]`` pixel preimage: RGB images averaged into a
    one-channel model (the average of normalised channels), where an L∞ budget in grey levels has no
    meaning. ``what`` names the setting in the one-line message."""
    if len(spec.mean) != spec.in_chans and spec.in_chans == 1:
        raise FewshotMedError(
            f"{what}: the attack needs [0, 1] pixels, but {spec.name} takes 1 channel averaged from RGB "
            "images; use a 3-channel backbone (model.in_chans: 3) or drop the adversarial setting"
        )


def pixels(images: np.ndarray | Tensor, spec: BackboneSpec, device: torch.device) -> Tensor:
    """``(N, H, W, C)`` uint8 -> ``(N, C, H, W)`` float32 in ``[0, 1]`` on ``device`` (source channels)."""
    channels = len(spec.mean)
    return to_model_input(images, (0.0,) * channels, (1.0,) * channels, channels, device)


def input_pixels(batch: Tensor, spec: BackboneSpec) -> Tensor:
    """Inverse of ``model_input``: ``(N, in_chans, H, W)`` normalised (possibly augmented) input ->
    ``(N, C, H, W)`` pixels clamped to ``[0, 1]`` (a grey image given 3 channels keeps its first);
    see ``check_pixel_space`` for the one case without an inverse."""
    channels = len(spec.mean)
    source = batch[:, :channels] if channels < batch.shape[1] else batch
    mean = batch.new_tensor(spec.mean).view(1, -1, 1, 1)
    std = batch.new_tensor(spec.std).view(1, -1, 1, 1)
    return (source.float() * std + mean).clamp(0, 1)


class PixelModel(nn.Module):
    """A classifier of ``[0, 1]`` pixel images, what ``pgd`` attacks: ``model_input`` then ``logits``.

    ``logits`` maps ``(B, in_chans, H, W)`` normalised input to ``(B, n_classes)``. An ``nn.Module`` is
    a submodule (eval/train and parameters follow this module); a plain function is not, so a closure
    over a training backbone keeps the backbone's mode whatever the attack sets on this module.
    ``n_classes`` is given, not probed: a probe of one image through a backbone in training mode
    fails in batch norm when its last feature map is 1 x 1 (16 px inputs to a ResNet).
    """

    def __init__(self, logits: Callable[[Tensor], Tensor], spec: BackboneSpec, n_classes: int) -> None:
        super().__init__()
        self.logits = logits
        self.spec = spec
        self.n_classes = n_classes

    def forward(self, images: Tensor) -> Tensor:
        """``(B, C, H, W)`` pixels -> ``(B, n_classes)`` float32 logits."""
        with autocast(images.device):
            return self.logits(model_input(images, self.spec)).float()


def frozen_call(module: nn.Module) -> Callable[[Tensor], Tensor]:
    """``module``'s forward at its current weights, detached, in its current mode, with its buffers
    copied: gradients reach only the input, and batch-norm running statistics stay as they are."""
    weights = {name: param.detach() for name, param in module.named_parameters()}
    weights |= {name: buffer.clone() for name, buffer in module.named_buffers()}
    return lambda inputs: functional_call(module, weights, (inputs,))


@dataclass
class AdversarialFinetuneResult:
    """What adversarial fine-tuning hands on.

    Attributes:
        backbone: the fine-tuned backbone (the one passed in, trained in place), in eval mode.
        head: the ``(n_base, D)`` linear base-class head trained with it.
        losses: ``(steps,)`` cross-entropy on the perturbed batch, per step.
        accuracies: ``(steps,)`` accuracy on the perturbed batch, per step.
        seconds_per_step: wall time per step, attack included.
    """

    backbone: nn.Module
    head: nn.Linear
    losses: list[float]
    accuracies: list[float]
    seconds_per_step: float


def adversarial_finetune(
    backbone: nn.Module,
    spec: BackboneSpec,
    pool: ClassSubset,
    attack: AdversarialConfig,
    steps: int,
    batch_size: int,
    device: torch.device,
    lr: float = 1e-4,
    augment: bool = True,
    seed: int = 0,
) -> AdversarialFinetuneResult:
    """Supervised PGD adversarial training (Madry et al., ICLR 2018) of ``backbone`` on base classes.

    A linear head over the base classes starts as the nearest-class-mean classifier of the backbone's
    eval-mode features (``W = 2μ_c``, ``b = -‖μ_c‖²``: ProtoNet as a linear model, Snell et al., 2017),
    so the first attacks face a working classifier. Each step draws ``batch_size`` images uniformly,
    augments them as meta-training does (when ``augment``), replaces them by PGD perturbations against
    the current backbone and head (train mode, running statistics untouched during the attack), and
    takes one Adam step at ``lr`` on the cross-entropy of the perturbed batch, backbone and head.

    Args:
        backbone: maps ``(B, C, H, W)`` to ``(B, D)``, ``D = backbone.num_features``; trained in place.
        spec: channels and normalisation of its inputs.
        pool: base classes of the train split; images ``(N, H, W, C)`` uint8, labels ``(N,)``.
        attack: ``epsilon``, ``steps``, ``step_size`` of the PGD, in pixel units.
        steps: optimizer steps.
        batch_size: images per step.
        device: where training runs.
        lr: Adam step size.
        augment: batched on-device augmentation before the attack.
        seed: seeds the batches, the augmentation and the attacks' random starts.

    Returns:
        The fine-tuned backbone and head, per-step loss and accuracy, and the time per step.
    """
    from fewshot_med.robustness.attacks import pgd

    check_pixel_space(spec, "adversarial fine-tuning")
    backbone.to(device)
    head = _class_mean_head(backbone, spec, pool, device)
    parameters = [p for p in backbone.parameters() if p.requires_grad] + list(head.parameters())
    optimizer = torch.optim.Adam(parameters, lr=lr)
    rng = np.random.default_rng(seed)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    labels_all = torch.from_numpy(pool.labels.astype(np.int64))
    losses, accuracies = [], []
    started = time.perf_counter()
    for _ in range(steps):
        rows = rng.integers(0, len(pool), batch_size)
        batch = to_model_input(pool.images[rows], spec.mean, spec.std, spec.in_chans, device)
        if augment:
            batch = augment_batch(batch, generator)
        labels = labels_all[rows].to(device)
        backbone.train()
        attacked = PixelModel(frozen_call(nn.Sequential(backbone, head)), spec, head.out_features)
        start = int(rng.integers(0, 2**31 - 1))
        clean = input_pixels(batch, spec)
        perturbed = pgd(attacked, clean, labels, attack.epsilon, attack.steps, attack.step_size, seed=start)
        optimizer.zero_grad(set_to_none=True)
        with autocast(device):
            logits = head(backbone(model_input(perturbed, spec)).float())
        loss = F.cross_entropy(logits.float(), labels)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        accuracies.append((logits.argmax(dim=1) == labels).float().mean().item())
    backbone.eval()
    seconds = (time.perf_counter() - started) / max(steps, 1)
    return AdversarialFinetuneResult(backbone, head, losses, accuracies, seconds)


def _class_mean_head(
    backbone: nn.Module, spec: BackboneSpec, pool: ClassSubset, device: torch.device
) -> nn.Linear:
    """The nearest-class-mean classifier of ``pool``'s eval-mode features as a linear layer on ``device``:
    ``-‖f - μ_c‖²`` up to the ``-‖f‖²`` shared by all classes."""
    features = embed(backbone, pool.images, spec, device).clone()  # (N, D) on the CPU
    labels = torch.from_numpy(pool.labels.astype(np.int64))
    n_classes = len(pool.class_names)
    means = class_means(features.unsqueeze(0), labels.unsqueeze(0), n_classes)[0]  # (n_classes, D)
    head = nn.Linear(features.shape[1], n_classes).to(device)
    with torch.no_grad():
        head.weight.copy_(2 * means)
        head.bias.copy_(-(means**2).sum(dim=1))
    return head
