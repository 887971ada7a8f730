"""L∞ evasion attacks on a torch classifier of ``[0, 1]`` images, through the Adversarial Robustness Toolbox.

ART (LF AI & Data, started at IBM; maintained) provides the attacks: ``ProjectedGradientDescentPyTorch``
(Madry, Makelov, Schmidt, Tsipras & Vladu, "Towards Deep Learning Models Resistant to Adversarial
Attacks", ICLR 2018) and ``FastGradientMethod`` (Goodfellow, Shlens & Szegedy, "Explaining and
Harnessing Adversarial Examples", ICLR 2015). torchattacks is not used: it pins ``requests==2.25``,
which conflicts with MLflow's dependencies, and its last release is from 2023.

Every attack here sees images in ``[0, 1]`` *before* normalisation (the model normalises), so
``epsilon`` is in pixel units (``8 / 255`` is eight grey levels) and ART clips to ``(0, 1)``.

ART's public ``generate`` takes and returns numpy arrays; inside it the PyTorch PGD runs on the
tensors' device, so one call costs one host copy each way plus ART's success-rate log (two extra
forward passes), small beside ``steps`` forward and backward passes: ``pgd`` uses that public API,
also inside training loops.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from art.attacks.evasion import FastGradientMethod, ProjectedGradientDescentPyTorch
from art.estimators.classification import PyTorchClassifier
from torch import Tensor, nn

#: Madry et al.'s step size relative to the budget: ``step_size = PGD_STEP_RATIO · ε / steps``.
PGD_STEP_RATIO = 2.5


def art_classifier(model: nn.Module, images: Tensor) -> PyTorchClassifier:
    """Wrap ``model`` (``(B, C, H, W)`` images in ``[0, 1]`` -> ``(B, n_way)`` logits) for ART on the
    images' device, with cross-entropy loss and ``clip_values=(0, 1)``; the number of classes is the
    model's ``n_classes`` attribute, else read from one eval-mode forward pass of ``images[:1]`` (the
    caller restores the mode)."""
    model.eval()
    n_classes = getattr(model, "n_classes", None)
    if n_classes is None:
        with torch.no_grad():
            n_classes = int(model(images[:1]).shape[-1])
    return PyTorchClassifier(
        model=model,
        loss=nn.CrossEntropyLoss(),
        input_shape=tuple(images.shape[1:]),
        nb_classes=n_classes,
        clip_values=(0.0, 1.0),
        device_type="gpu" if images.is_cuda else "cpu",
    )


@contextmanager
def _attack_scope(model: nn.Module, seed: int | None) -> Iterator[None]:
    """Freeze ``model``'s parameters (ART's backward then computes only the input gradient and leaves
    the caller's ``.grad`` alone), seed numpy's global generator (ART's random start draws from it),
    and restore the train/eval mode, parameters and generator afterwards."""
    parameters = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    training = model.training
    state = np.random.get_state() if seed is not None else None
    try:
        for p, _, _ in parameters:
            p.requires_grad_(False)
        if seed is not None:
            np.random.seed(seed)
        yield
    finally:
        for p, requires_grad, grad in parameters:
            p.requires_grad_(requires_grad)
            p.grad = grad
        model.train(training)
        if state is not None:
            np.random.set_state(state)


def _as_tensor(adversarial: np.ndarray, like: Tensor) -> Tensor:
    return torch.from_numpy(adversarial).to(device=like.device, dtype=like.dtype)


def pgd(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    epsilon: float,
    steps: int,
    step_size: float | None = None,
    random_start: bool = True,
    seed: int | None = None,
) -> Tensor:
    """Untargeted L∞ projected gradient descent (Madry et al., ICLR 2018) with ART.

    Maximises the cross-entropy of ``model(images)`` w.r.t. ``labels`` over the L∞ ball of radius
    ``epsilon`` around ``images``, intersected with ``[0, 1]``. The model runs in eval mode during the
    attack (batch-norm statistics untouched); its mode, parameters' ``requires_grad`` and ``.grad``
    are restored, so this is safe inside a training loop.

    Args:
        model: ``(B, C, H, W)`` images in ``[0, 1]`` -> ``(B, n_way)`` logits (normalising inside).
        images: ``(B, C, H, W)`` clean images in ``[0, 1]``.
        labels: ``(B,)`` integer labels.
        epsilon: the L∞ budget in pixel units (``8 / 255``).
        steps: gradient-sign steps.
        step_size: per-step size; ``2.5 · epsilon / steps`` (Madry et al.) when ``None``.
        random_start: start from a uniform point of the ball instead of the clean images.
        seed: seeds the random start (numpy's global generator, restored afterwards).

    Returns:
        ``(B, C, H, W)`` adversarial images in ``[0, 1]``, ``‖x_adv - images‖∞ ≤ epsilon``, on the
        images' device and dtype.
    """
    step = PGD_STEP_RATIO * epsilon / steps if step_size is None else step_size
    with _attack_scope(model, seed):
        attack = ProjectedGradientDescentPyTorch(
            art_classifier(model, images),
            norm=np.inf,
            eps=epsilon,
            eps_step=step,
            max_iter=steps,
            num_random_init=int(random_start),
            batch_size=len(images),
            verbose=False,
        )
        x = images.detach().cpu().float().numpy()
        adversarial = attack.generate(x, labels.detach().cpu().numpy())
    return _as_tensor(adversarial, images)


def fgsm(model: nn.Module, images: Tensor, labels: Tensor, epsilon: float) -> Tensor:
    """Fast gradient sign method (Goodfellow et al., ICLR 2015) with ART: one step of size
    ``epsilon`` along the sign of the cross-entropy gradient, clipped to ``[0, 1]``.

    Shapes and units as ``pgd``: ``(B, C, H, W)`` images in ``[0, 1]``, ``(B,)`` labels ->
    ``(B, C, H, W)`` adversarial images.
    """
    with _attack_scope(model, None):
        attack = FastGradientMethod(
            art_classifier(model, images), norm=np.inf, eps=epsilon, batch_size=len(images)
        )
        x = images.detach().cpu().float().numpy()
        adversarial = attack.generate(x, labels.detach().cpu().numpy())
    return _as_tensor(adversarial, images)
