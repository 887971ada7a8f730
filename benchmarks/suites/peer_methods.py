"""The peer methods the benchmarks compare against: easyfsl's few-shot classifiers and scikit-learn's
per-episode logistic regression, each wrapped as an ``EpisodeClassifier`` on frozen features.

Peers run exactly as their library ships them (default hyperparameters, one episode at a time), on
the same backbone features and the same episode lists as this toolkit's methods. Their only choice
is the feature preprocessing their API offers (``feature_centering`` and ``feature_normalization``
in easyfsl): raw, L2-normalised, or centred on the base-class mean then L2-normalised, picked per peer
on val episodes (``PREPROCESSING``). easyfsl and scikit-learn outputs are turned into
log-probabilities: with ``use_softmax=True`` easyfsl applies each method's own temperature (TIM and
Finetune score cosine similarities times 10; without it their scores would be softmaxed at
temperature 1); PT-MAP and LaplacianShot return soft assignments directly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fewshot_med.evaluation.runner import EpisodeClassifier

#: Smallest probability kept before the log (a probability of exactly 0 would give an infinite NLL).
MIN_PROBABILITY = 1e-12

#: Feature preprocessing a peer may use: name -> (centre on the base-class mean, L2-normalise).
PREPROCESSING: dict[str, tuple[bool, bool]] = {
    "raw": (False, False),
    "l2": (False, True),
    "centred+l2": (True, True),
}

ClassifierFactory = Callable[[Tensor | None, bool], EpisodeClassifier]


@dataclass(frozen=True)
class Peer:
    """A peer method: its row label, library, class or estimator there, whether it reads the queries,
    and a factory ``make(centring, normalise) -> EpisodeClassifier`` (``centring``: ``(D,)`` or ``None``)."""

    label: str
    library: str
    method: str
    transductive: bool
    make: ClassifierFactory


def easyfsl_classifier(class_name: str, soft_assignments: bool = False, **params: Any) -> ClassifierFactory:
    """A factory of episode classifiers running ``easyfsl.methods.<class_name>`` on features.

    Args:
        class_name: the easyfsl class (e.g. ``"TIM"``).
        soft_assignments: the method returns per-query class probabilities itself (PT-MAP,
            LaplacianShot), rather than scores that ``use_softmax`` turns into probabilities.
        **params: constructor arguments besides the preprocessing (none: the library defaults).
    """

    def make(centring: Tensor | None, normalise: bool) -> EpisodeClassifier:
        from easyfsl import methods

        method_class = getattr(methods, class_name)

        def classify(support: Tensor, labels: Tensor, queries: Tensor) -> Tensor:
            model = method_class(
                use_softmax=True,
                feature_centering=centring,
                feature_normalization=2 if normalise else None,
                **params,
            )
            with torch.no_grad():
                model.process_support_set(support, labels)
                probabilities = model(queries).detach().double()
            if soft_assignments:  # Sinkhorn plans and bound updates are not exactly row-normalised
                probabilities = probabilities / probabilities.sum(dim=-1, keepdim=True)
            return probabilities.clamp_min(MIN_PROBABILITY).log()

        return classify

    return make


def sklearn_logistic_regression(centring: Tensor | None, normalise: bool) -> EpisodeClassifier:
    """scikit-learn's ``LogisticRegression`` (defaults: L2, C = 1, lbfgs) fitted per episode, the
    linear probe most few-shot transfer papers report."""
    from sklearn.linear_model import LogisticRegression

    def prepare(features: Tensor) -> Tensor:
        features = features - centring if centring is not None else features
        return F.normalize(features, dim=-1) if normalise else features

    def classify(support: Tensor, labels: Tensor, queries: Tensor) -> Tensor:
        model = LogisticRegression(max_iter=1000).fit(prepare(support).cpu().numpy(), labels.cpu().numpy())
        return torch.from_numpy(model.predict_log_proba(prepare(queries).cpu().numpy()))

    return classify


#: Every peer by row label; transductive ones read the episode's queries while adapting.
PEERS: dict[str, Peer] = {
    peer.label: peer
    for peer in (
        *(
            Peer(label, "easyfsl", name, transductive, easyfsl_classifier(name, soft))
            for label, name, transductive, soft in (
                ("easyfsl ProtoNet", "PrototypicalNetworks", False, False),
                ("easyfsl SimpleShot", "SimpleShot", False, False),
                ("easyfsl Finetune", "Finetune", False, False),
                ("easyfsl TIM", "TIM", True, False),
                ("easyfsl BD-CSPN", "BDCSPN", True, False),
                ("easyfsl PT-MAP", "PTMAP", True, True),
                ("easyfsl LaplacianShot", "LaplacianShot", True, True),
                ("easyfsl TransductiveFinetuning", "TransductiveFinetuning", True, False),
            )
        ),
        Peer("sklearn LogReg", "scikit-learn", "LogisticRegression", False, sklearn_logistic_regression),
    )
}
