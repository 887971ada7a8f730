"""Can a transductive method be calibrated from its own support set? Held-out support folds against
the val temperature.

A transductive method's confidence depends on the query set it infers over, so a temperature fitted
on val episodes with fewer queries (HAM10000's val split has 10 df images: 5 queries per class at 5
shots, against 15 at test) is fitted on another regime. This tries the support set of each test
episode instead: in fold ``f`` of ``K``, the ``f``-th support image of every class is held out and
joins the episode's queries as an unlabelled image, the method is fitted on the other ``K - 1`` shots
and infers over the test queries plus the held-out images; the held-out images' logits are then
labelled predictions made in the test regime. Reported per transductive method of the config (its
search chosen on val episodes, as the evaluate stage does) and K ≥ 2: accuracy and pooled ECE raw,
after the val temperature, after a per-episode temperature fitted on the episode's held-out
predictions (deployable: one episode's own data), and after one temperature fitted on the held-out
predictions of all test episodes pooled (not deployable for a single task: a reference of what
the held-out signal carries when its noise is averaged away).

Two more columns, for every K: the val temperature extrapolated to the test regime (a temperature
fitted on val episodes with 1, 2, … queries per class, ``log T`` regressed on ``log`` queries per
class and read at the test episodes' count; deployable: val labels only), and the temperature fitted
on the test queries themselves (not deployable: the floor of what any single temperature reaches).

Two label-free columns, for every K: the temperature that makes the mean confidence on the test
queries equal the accuracy that average thresholded confidence predicts for them (ATC: Garg, Balakrishnan,
Lipton, Neyshabur & Sedghi, "Leveraging Unlabeled Data to Predict Out-of-Distribution Performance",
ICLR 2022). The threshold is set on the val episodes after the val temperature, so that the share
of val queries above it equals the val accuracy; the test accuracy predicted is the share of test
queries above it. Fitted once over all test episodes' unlabelled queries (deployable where a batch
of unlabelled cases is at hand), and per episode from its own queries (deployable for one task).

Run: ``python -m benchmarks.scripts.transductive_calibration CONFIG --from RUN [--threads N]``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import embed_run, searched_results, transductive_frozen_methods
from fewshot_med.config import load_config
from fewshot_med.data import ClassSubset
from fewshot_med.data.episodes import EpisodeList, sample_episodes
from fewshot_med.evaluation.calibration import (
    TemperatureScaling,
    calibrate_with_val_episodes,
    fit_episode_temperatures,
)
from fewshot_med.evaluation.metrics import pooled_ece, softmax
from fewshot_med.evaluation.runner import evaluate_frozen
from fewshot_med.methods import FewShotMethod
from fewshot_med.robustness.evaluate import episode_positions


def _rows(x: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
    """``(E, n, D)`` -> ``(E, m, D)``: each episode's ``rows`` ``(E, m)``."""
    return torch.gather(x, 1, torch.as_tensor(rows)[..., None].expand(-1, -1, x.shape[-1]))


def held_out_fold_logits(
    factory: Callable[[], FewShotMethod], features: torch.Tensor, pool: ClassSubset, episodes: EpisodeList
) -> tuple[np.ndarray, np.ndarray]:
    """``(E, n_way·K, n_way)`` logits of every support image held out in its fold (the method fitted
    on the other ``K - 1`` shots, inferring over the queries plus the held-out images) and their labels."""
    support_positions, query_positions = episode_positions(pool, episodes)
    support, queries = (
        features[torch.as_tensor(support_positions)],
        features[torch.as_tensor(query_positions)],
    )
    support_labels = episodes.arrays.support_labels
    labels = torch.as_tensor(support_labels)
    n_way, k = int(support_labels.max()) + 1, episodes.k_shot
    by_class = np.argsort(support_labels, axis=1, kind="stable").reshape(len(support), n_way, k)
    logits, held_labels = [], []
    for fold in range(k):
        held = by_class[:, :, fold]  # (E, n_way): one image of each class
        kept = np.sort(np.delete(by_class, fold, axis=2).reshape(len(support), -1), axis=1)
        method = factory().fit(_rows(support, kept), torch.gather(labels, 1, torch.as_tensor(kept)))
        scored = method.predict_logits(torch.cat([queries, _rows(support, held)], dim=1))
        logits.append(scored[:, -n_way:].double().numpy())
        held_labels.append(np.take_along_axis(support_labels, held, axis=1))
    return np.concatenate(logits, axis=1), np.concatenate(held_labels, axis=1)


def query_count_temperature(
    factory: Callable[[], FewShotMethod],
    features: torch.Tensor,
    pool: ClassSubset,
    val_episodes: EpisodeList,
    n_query_test: int,
) -> tuple[float, dict[int, float]]:
    """The val temperature read at ``n_query_test`` queries per class: one temperature fitted on the
    val episodes redrawn with each query count the val split allows (the same shots, episodes and
    seed), then ``log T`` regressed linearly on ``log`` queries per class. Returns the extrapolated
    temperature and the fitted one per query count."""
    n_way, k = int(val_episodes.arrays.support_labels.max()) + 1, val_episodes.k_shot
    most = int(np.bincount(pool.labels).min()) - k
    temperatures = {}
    for n_query in range(1, most + 1):
        episodes = sample_episodes(pool, n_way, k, n_query, len(val_episodes), val_episodes.seed)
        result = evaluate_frozen(factory, features, pool, episodes)
        temperatures[n_query] = TemperatureScaling(t_max=100.0).fit(result.logits, result.labels).temperature_
    slope, intercept = np.polyfit(np.log(list(temperatures)), np.log(list(temperatures.values())), 1)
    return float(np.exp(intercept + slope * np.log(n_query_test))), temperatures


def _mean_confidence(logits: np.ndarray) -> np.ndarray:
    """``(..., n, C)`` logits -> ``(...)`` mean top-label softmax probability over the ``n`` rows."""
    return softmax(logits).max(axis=-1).mean(axis=-1)


def confidence_matching_temperature(logits: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Per leading index, the temperature whose mean top-label confidence equals ``target``.

    ``(..., n, C)`` logits and ``(...)`` targets in ``[1/C, 1]`` -> ``(...)`` temperatures in
    ``[0.01, 100]`` (bisection on ``log T``; the mean confidence falls as ``T`` grows)."""
    low, high = np.full(target.shape, np.log(0.01)), np.full(target.shape, np.log(100.0))
    for _ in range(60):
        middle = (low + high) / 2
        too_confident = _mean_confidence(logits / np.exp(middle)[..., None, None]) > target
        low, high = np.where(too_confident, middle, low), np.where(too_confident, high, middle)
    return np.exp((low + high) / 2)


def atc_accuracy(val_logits: np.ndarray, val_labels: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """Average thresholded confidence (Garg et al., ICLR 2022): the threshold ``t`` on top-label
    confidence at which the share of ``(E_v, n, C)`` val queries above ``t`` equals their accuracy;
    returns the share of each episode's queries of ``(E, n, C)`` ``logits`` above ``t``, ``(E,)``."""
    val_confidence = softmax(val_logits).max(axis=-1).ravel()
    val_accuracy = (val_logits.argmax(axis=-1) == val_labels).mean()
    threshold = np.quantile(val_confidence, 1 - val_accuracy)
    return (softmax(logits).max(axis=-1) > threshold).mean(axis=-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path)
    parser.add_argument(
        "--from", dest="from_run", required=True, help="the pipeline run whose backbone is read"
    )
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    config = load_config(args.config)
    embedded, episodes = embed_run(config, args.from_run)
    test_pool, val_pool = embedded.pools["test"], embedded.pools["val"]
    test_features, val_features = embedded.features["novel_test"], embedded.features["novel_val"]
    print(
        "| method | K | accuracy | ECE raw | val temperature | held-out folds, per episode (median T) "
        "| held-out folds, pooled over episodes (T) | val temperature at the test query count (T) "
        "| ATC, pooled over episodes (T; predicted accuracy) | ATC, per episode (median T) "
        "| temperature fitted on the test queries (T) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    features = {"test": test_features, "val": val_features}
    for method in transductive_frozen_methods(config):
        for k in episodes.test:
            factory, test, val = searched_results(
                method, embedded.methods, features, embedded.pools, episodes.val[k], episodes.test[k]
            )

            def ece(logits: np.ndarray, labels: np.ndarray = test.labels) -> float:
                return pooled_ece(softmax(logits), labels)[0]

            val_calibrated = calibrate_with_val_episodes(test, val)
            cells = [
                f"{100 * test.values('accuracy').mean():.1f}",
                f"{ece(test.logits):.3f}",
                f"{ece(val_calibrated.logits):.3f} ({val_calibrated.calibrator['temperature']:.2f})",
            ]
            if k >= 2:
                held, held_labels = held_out_fold_logits(factory, test_features, test_pool, episodes.test[k])
                per_episode = fit_episode_temperatures(held, held_labels, t_max=100.0)
                pooled = TemperatureScaling(t_max=100.0).fit(held, held_labels).temperature_
                cells += [
                    f"{ece(test.logits / per_episode[:, None, None]):.3f} ({np.median(per_episode):.2f})",
                    f"{ece(test.logits / pooled):.3f} ({pooled:.2f})",
                ]
            else:
                cells += ["—", "—"]
            n_query_test = test.logits.shape[1] // test.logits.shape[2]
            extrapolated, by_count = query_count_temperature(
                factory, val_features, val_pool, episodes.val[k], n_query_test
            )
            val_t = val_calibrated.calibrator["temperature"]
            predicted = atc_accuracy(val.logits / val_t, val.labels, test.logits / val_t)
            all_queries = test.logits.reshape(-1, test.logits.shape[-1])  # one pool of unlabelled queries
            pooled_atc = float(confidence_matching_temperature(all_queries, predicted.mean()))
            per_episode_atc = confidence_matching_temperature(test.logits, predicted)
            floor = TemperatureScaling(t_max=100.0).fit(test.logits, test.labels).temperature_
            cells += [
                f"{ece(test.logits / extrapolated):.3f} ({extrapolated:.2f}; fitted "
                + ", ".join(f"{q}: {t:.2f}" for q, t in by_count.items())
                + ")",
                f"{ece(test.logits / pooled_atc):.3f} ({pooled_atc:.2f}; {100 * predicted.mean():.1f})",
                f"{ece(test.logits / per_episode_atc[:, None, None]):.3f} ({np.median(per_episode_atc):.2f})",
                f"{ece(test.logits / floor):.3f} ({floor:.2f})",
            ]
            print(f"| {method.display_name} | {k} | " + " | ".join(cells) + " |", flush=True)
    print(f"\n{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
