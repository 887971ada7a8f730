"""The adapted few-shot pipeline as one differentiable torch module, for white-box attacks.

``AdaptedModel``: ``[0, 1]`` images -> normalisation -> backbone features -> the method's feature
transform and head fitted on the episode's clean support features -> logits; gradients flow through
the backbone and the head. ``SupportAttackModel``: one support image -> a chosen query's logits, the
head re-fitted from the support set on every call, so gradients flow through the fit itself.

Covered methods are the frozen-feature inductive ones whose ``predict_logits`` is a differentiable
function of the query features (``ATTACKABLE``); of those, the ones whose ``fit`` is a differentiable
function of the support features (class means, R2-D2's closed-form ridge solve) also take the
support-set attack (``SUPPORT_ATTACKABLE``). Not covered: fine-tuning methods (an attack step would
back-propagate through every fine-tuning step of every episode: minutes per episode on CPU),
transductive methods (a query's logits depend on the whole query batch, so an attack must perturb
the query set jointly, a different threat model), logistic regression's support attack (its Newton
solve is iterative; differentiating it needs implicit differentiation).
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor, nn

from fewshot_med.methods import FewShotMethod
from fewshot_med.models import BackboneSpec
from fewshot_med.models.views import view_features

#: Methods whose adapted pipeline is attacked end to end (query attacks).
ATTACKABLE = ("simpleshot", "protonet", "r2d2", "logreg")
#: Methods whose fit is differentiable in the support features (support-set attack).
SUPPORT_ATTACKABLE = ("simpleshot", "protonet", "r2d2")

MethodFactory = Callable[[], FewShotMethod]


def unit_images(images: np.ndarray, device: torch.device | str = "cpu") -> Tensor:
    """``(N, H, W, C)`` uint8 -> ``(N, C, H, W)`` float32 in ``[0, 1]``: what attacks perturb."""
    return torch.as_tensor(images).to(device).permute(0, 3, 1, 2).float().div_(255)


def model_input(images: Tensor, spec: BackboneSpec) -> Tensor:
    """``(N, C, H, W)`` pixels in ``[0, 1]`` (``C`` = ``len(spec.mean)``) -> ``(N, in_chans, H, W)``
    normalised model input, as ``to_model_input`` makes it from uint8; differentiable."""
    mean = images.new_tensor(spec.mean).view(1, -1, 1, 1)
    std = images.new_tensor(spec.std).view(1, -1, 1, 1)
    batch = (images - mean) / std
    if batch.shape[1] != spec.in_chans:
        batch = (
            batch.mean(dim=1, keepdim=True) if spec.in_chans == 1 else batch.expand(-1, spec.in_chans, -1, -1)
        )
    return batch


class FeatureModel(nn.Module):
    """``(B, C, H, W)`` images in ``[0, 1]`` -> ``(B, D)`` backbone features, normalised on the way as
    ``fewshot_med.data.transforms.to_model_input`` does (mean/std of ``spec``, channels repeated or
    averaged to ``spec.in_chans``), averaged over the test-time views ``spec.views``, so clean features
    equal the pipeline's ``embed`` on CPU. A backbone holding inference tensors (made under
    ``torch.inference_mode``) is copied first; any other is shared, so training it trains this module too."""

    def __init__(self, backbone: nn.Module, spec: BackboneSpec) -> None:
        super().__init__()
        tensors = itertools.chain(backbone.parameters(), backbone.buffers())
        if any(t.is_inference() for t in tensors):  # autograd cannot save those: work on a plain copy
            backbone = copy.deepcopy(backbone)
        self.backbone = backbone.eval()
        self.spec = spec
        self.eval()  # batch-norm on its running statistics, as the pipeline embeds

    def forward(self, images: Tensor) -> Tensor:
        return view_features(self.backbone, model_input(images, self.spec), self.spec.views).float()


class AdaptedModel(nn.Module):
    """The adapted pipeline: ``(B, C, H, W)`` images in ``[0, 1]`` -> ``(B, n_way)`` logits of a method
    fitted on clean support features (its head is fixed; the attack moves the queries).

    Fitted on one episode (``n_episodes_`` unset), every image is scored by its head. Fitted on ``E``
    episodes at once (a batched frozen-feature fit), the images are episode-major, ``B = E · m``: the
    ``m`` images of episode ``e`` are rows ``e·m … e·m + m - 1`` and are scored by episode ``e``'s head.
    In eval mode an image's features and gradient do not depend on its batch, so one attack on the
    ``E · m`` images is ``E`` attacks of ``m`` images at the cost of one
    (``fewshot_med.robustness.evaluate``).
    """

    def __init__(self, features: FeatureModel, method: FewShotMethod) -> None:
        super().__init__()
        self.features = features
        self.method = method
        self.eval()

    @property
    def n_classes(self) -> int:
        """Classes of every episode (the logits' last dimension)."""
        return self.method.n_way_

    def forward(self, images: Tensor) -> Tensor:
        features = self.features(images)
        episodes = self.method.n_episodes_
        if episodes is None:
            return self.method.predict_logits(features).to(images.device)
        if len(features) % episodes:
            raise ValueError(f"{len(features)} images cannot be split evenly over {episodes} episodes")
        logits = self.method.predict_logits(features.view(episodes, -1, features.shape[-1]))
        return logits.flatten(0, 1).to(images.device)


def adapt(factory: MethodFactory, features: FeatureModel, support: Tensor, labels: Tensor) -> AdaptedModel:
    """Fit ``factory()`` on clean support features and return the adapted pipeline around ``features``:
    one episode's ``(n_support, D)`` features and ``(n_support,)`` labels, or ``E`` episodes'
    ``(E, n_support, D)`` and ``(E, n_support)`` (one batched fit; see ``AdaptedModel``)."""
    with torch.no_grad():
        method = factory().fit(support, labels)
    return AdaptedModel(features, method)


class SupportAttackModel(nn.Module):
    """``(R, C, H, W)`` images in ``[0, 1]``, image ``r`` standing for support sample ``index[r]`` of
    support set ``r`` -> ``(R, n_way)`` logits of target query ``r``, every head re-fitted
    (differentiably, one batched fit) on its support set with that sample's features replaced by the
    image's. ``R`` attacks of one support image each, run as one (the rows are independent: eval-mode
    features do not depend on the batch); one attack is ``R = 1``.

    Args:
        factory: builds the unfitted method (one of ``SUPPORT_ATTACKABLE``).
        features: the normalising backbone.
        support: ``(R, n_support, D)`` clean support features, or one set ``(n_support, D)``; labels
            ``(R, n_support)`` or ``(n_support,)``.
        index: ``(R,)`` which support sample each image replaces, or one ``int``.
        query: ``(R, D)`` clean features of the target queries, or one ``(D,)``.
    """

    def __init__(
        self,
        factory: MethodFactory,
        features: FeatureModel,
        support: Tensor,
        labels: Tensor,
        index: int | Tensor,
        query: Tensor,
    ) -> None:
        super().__init__()
        self.factory, self.features = factory, features
        single = support.ndim == 2
        support, labels = (support.unsqueeze(0), labels.unsqueeze(0)) if single else (support, labels)
        index = torch.as_tensor(index, device=support.device).view(-1)
        # clones: features from ``embed`` are inference tensors, which autograd may not save
        self.register_buffer("support", support.detach().clone(), persistent=False)
        self.register_buffer("labels", labels, persistent=False)
        self.register_buffer("query", query.detach().clone().view(len(support), 1, -1), persistent=False)
        positions = torch.arange(support.shape[1], device=support.device)
        self.register_buffer("keep", (positions[None, :] != index[:, None]).unsqueeze(-1), persistent=False)
        self.eval()

    def forward(self, images: Tensor) -> Tensor:
        replaced = self.features(images).unsqueeze(1)  # (R, 1, D)
        support = torch.where(self.keep, self.support, replaced)
        logits = self.factory().fit(support, self.labels).predict_logits(self.query)  # (R, 1, n_way)
        return logits[:, 0].to(images.device)
