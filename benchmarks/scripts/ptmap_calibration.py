"""Can PT-MAP be calibrated by more than a temperature on its logits? Two candidates, against the val
temperature and its floor (the temperature fitted on the test queries themselves).

- **The final assignment's kernel temperature.** PT-MAP's logits are the log of a Sinkhorn plan with
  balanced columns; dividing them by a temperature breaks that balance. Recomputing the last plan
  from the fitted centres with another inverse temperature ``λ'`` keeps it, so it is a different
  one-parameter family of probabilities. Each ``λ'`` is reported raw, after the val temperature and
  at its floor; ``λ' = lam`` is PT-MAP as the pipeline runs it.
- **An ensemble with alpha-TIM**: the mean of the two methods' probabilities, each with its search
  chosen on val episodes.

Reported per K on the backbone and episodes of a pipeline run (the config's ``pt_map`` and
``alpha_tim`` entries, their searches chosen on val episodes as the evaluate stage does): accuracy
and pooled ECE raw, after the val temperature and at the floor, with the temperatures in brackets.
Run: ``python -m benchmarks.scripts.ptmap_calibration CONFIG --from RUN [--lams 3 5 10] [--threads N]``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.common import embed_run
from fewshot_med.config import MethodConfig, load_config
from fewshot_med.evaluation.calibration import TemperatureScaling, calibrate_with_val_episodes
from fewshot_med.evaluation.metrics import pooled_ece, softmax
from fewshot_med.evaluation.runner import EpisodeResults, evaluate_frozen, score_episodes
from fewshot_med.methods import create_method
from fewshot_med.methods.base import euclidean_distances
from fewshot_med.methods.pt_map import MIN_PROBABILITY, PTMAP, sinkhorn
from fewshot_med.pipelines.evaluation import search_on_val


def final_assignment(method: PTMAP, query: torch.Tensor, lam: float) -> torch.Tensor:
    """``(E, n_query, n_way)`` log of the balanced Sinkhorn plan of the fitted ``method``'s centres
    (``centres_``, from its ``predict_logits`` on the same ``query``), with inverse temperature
    ``lam`` instead of the method's own; the query transform and episode centring are PT-MAP's."""
    support = method.support_
    episode = torch.cat([support, method._transform_queries(query)], dim=1)
    episode = F.normalize(episode - episode.mean(dim=1, keepdim=True), dim=-1)
    transformed = episode[:, support.shape[1] :]
    column_mass = torch.full(
        (len(transformed), method.n_way_), transformed.shape[1] / method.n_way_, dtype=episode.dtype
    )
    scores = -lam * euclidean_distances(transformed, method.centres_, squared=True)
    return sinkhorn(scores, column_mass, method.sinkhorn_iterations).clamp_min(MIN_PROBABILITY).log()


def pt_map_at(make: Callable[[], PTMAP], lam: float) -> PTMAP:
    """A fresh PT-MAP from ``make`` whose logits are its final plan recomputed at ``lam``."""
    method = make()
    fit_centres = method._predict_logits

    def logits(query: torch.Tensor) -> torch.Tensor:
        fit_centres(query)
        return final_assignment(method, query, lam)

    method._predict_logits = logits
    return method


def _cells(test: EpisodeResults, val: EpisodeResults) -> str:
    """``accuracy | raw ECE | val-temperature ECE (T) | floor ECE (T)`` of test logits and labels."""
    calibrated = calibrate_with_val_episodes(test, val)
    floor = TemperatureScaling(t_max=100.0).fit(test.logits, test.labels).temperature_

    def ece(logits: np.ndarray) -> float:
        return pooled_ece(softmax(logits), test.labels)[0]

    return (
        f"{100 * test.values('accuracy').mean():.1f} | {ece(test.logits):.3f} | "
        f"{ece(calibrated.logits):.3f} ({calibrated.calibrator['temperature']:.2f}) | "
        f"{ece(test.logits / floor):.3f} ({floor:.2f})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path)
    parser.add_argument(
        "--from", dest="from_run", required=True, help="the pipeline run whose backbone is read"
    )
    parser.add_argument("--lams", type=float, nargs="+", default=[3.0, 5.0, 10.0])
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    config = load_config(args.config)
    embedded, episodes = embed_run(config, args.from_run)
    pools = {"test": embedded.pools["test"], "val": embedded.pools["val"]}
    features = {"test": embedded.features["novel_test"], "val": embedded.features["novel_val"]}
    by_label = {method.display_name: method for method in config.methods}
    pt_map, alpha_tim = by_label["pt_map"], by_label["alpha_tim"]

    def factory(method: MethodConfig, k: int) -> partial:
        chosen, _, _ = search_on_val(
            method, embedded.methods, features["val"], pools["val"], episodes.val[k], {}
        )
        return partial(create_method, method.name, embedded.methods, **method.params, **chosen)

    print("| K | probabilities | accuracy | ECE raw | val temperature (T) | temperature fitted on test (T) |")
    print("|---|---|---|---|---|---|")
    for k in episodes.test:
        make_pt_map, make_alpha_tim = factory(pt_map, k), factory(alpha_tim, k)
        split_episodes = {"test": episodes.test[k], "val": episodes.val[k]}
        for lam in args.lams:
            results = {
                split: evaluate_frozen(
                    partial(pt_map_at, make_pt_map, lam), features[split], pools[split], split_episodes[split]
                )
                for split in ("test", "val")
            }
            print(f"| {k} | PT-MAP, final plan at λ' = {lam:g} | {_cells(results['test'], results['val'])} |")
        ensemble = {}
        for split in ("test", "val"):
            members = [
                evaluate_frozen(make, features[split], pools[split], split_episodes[split])
                for make in (make_pt_map, make_alpha_tim)
            ]
            mean = np.mean([softmax(member.logits) for member in members], axis=0)
            ensemble[split] = score_episodes("ensemble", k, np.log(mean), members[0].labels)
        print(
            f"| {k} | mean of PT-MAP and alpha-TIM | {_cells(ensemble['test'], ensemble['val'])} |",
            flush=True,
        )
    print(f"\n{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
