"""The peer wrappers: the libraries' own methods, giving log-probabilities on our episode layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fewshot_med.methods import MethodContext, create_method

easyfsl = pytest.importorskip(
    "easyfsl", reason="the peer benchmarks need the bench extra: pip install -e '.[bench]'"
)

from benchmarks.suites.peer_methods import PEERS, PREPROCESSING, sklearn_logistic_regression  # noqa: E402


def _episode(seed: int = 0, n_way: int = 3, k_shot: int = 5, n_query: int = 15, dim: int = 16):
    generator = torch.Generator().manual_seed(seed)
    means = 3 * torch.randn(n_way, dim, generator=generator)
    support_labels = torch.arange(n_way).repeat_interleave(k_shot)
    query_labels = torch.arange(n_way).repeat_interleave(n_query)
    support = means[support_labels] + torch.randn(len(support_labels), dim, generator=generator)
    queries = means[query_labels] + torch.randn(len(query_labels), dim, generator=generator)
    return support.relu(), support_labels, queries.relu(), query_labels  # non-negative, like ReLU features


@pytest.mark.parametrize("label", list(PEERS))
@pytest.mark.parametrize("preprocessing", list(PREPROCESSING))
def test_every_peer_gives_log_probabilities_and_learns(label, preprocessing):
    support, labels, queries, query_labels = _episode()
    centre, normalise = PREPROCESSING[preprocessing]
    classify = PEERS[label].make(support.mean(dim=0) if centre else None, normalise)
    logits = classify(support, labels, queries)
    assert logits.shape == (45, 3)
    if label == "easyfsl PT-MAP" and preprocessing == "centred+l2":
        return  # PT-MAP's power transform of negative (centred) features is NaN: the suite reports it
    assert torch.isfinite(logits).all()
    np.testing.assert_allclose(logits.double().exp().sum(dim=1).numpy(), 1.0, atol=1e-6)
    assert (logits.argmax(dim=1) == query_labels).float().mean() > 0.8  # well-separated classes


def test_transductive_flags_are_the_libraries_own():
    for peer in PEERS.values():
        if peer.library == "easyfsl":
            assert getattr(easyfsl.methods, peer.method).is_transductive() is peer.transductive, peer.label


def test_sklearn_peer_matches_our_exact_batched_logreg():
    support, labels, queries, _ = _episode(seed=1)
    peer = sklearn_logistic_regression(None, True)(support, labels, queries)
    ours = create_method("logreg", MethodContext()).fit(support, labels).predict_logits(queries)
    # same objective; the peer runs scikit-learn's defaults (lbfgs, tol 1e-4), hence the tolerance
    np.testing.assert_allclose(torch.softmax(ours.double(), 1).numpy(), peer.exp().numpy(), atol=1e-3)
