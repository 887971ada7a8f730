"""The peers suite: this toolkit's methods beside easyfsl's and scikit-learn's, on identical episodes.

Per dataset (HAM10000 and PBC, the guide's protocol, section 3; or the pipeline configs given with
``--config``) one backbone, the pipeline's own (pretrained, then meta-trained when its config says
so), trained here or reused from an earlier run (``--from``), embeds every image once. Then, on the
same saved test episodes for each K of the config:

1. every method of the dataset's config, calibrated by its val-episode temperature, and every peer of
   ``peer_methods.PEERS`` (its feature preprocessing chosen on val episodes): accuracy, balanced
   accuracy, pooled ECE, NLL with 95% CIs, and the paired accuracy difference of our best against the
   best peer, of any kind, then inductive against inductive and transductive against transductive
   (the verdicts, also returned as JSON objects, ``SuiteReport.verdicts``);
2. temperature scaling here against netcal's on the same logits (fitted on val episodes, scored on
   test episodes): ECE, NLL and fit time, and our ECE against netcal's ECE on the same probabilities;
3. the oracle (a probe on all novel-class train images) and accuracy against shots.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import (
    Lineage,
    SuiteOptions,
    SuiteReport,
    open_dataset,
    paired_on_common_episodes,
    require_modules,
)
from benchmarks.suites.peer_methods import PEERS, PREPROCESSING, Peer
from fewshot_med import tracking
from fewshot_med.data import EpisodeList
from fewshot_med.evaluation import EpisodeResults, evaluate_episodewise, evaluate_frozen, softmax
from fewshot_med.evaluation.calibration import TemperatureScaling
from fewshot_med.evaluation.metrics import ece
from fewshot_med.methods import METHODS, MethodContext, create_method
from fewshot_med.pipelines.episodes import Episodes, draw_episodes
from fewshot_med.pipelines.evaluation import evaluate_method, evaluate_oracle_rows
from fewshot_med.tracking import names

REPO = Path(__file__).resolve().parents[2]
#: Dataset name -> the pipeline config whose backbone, episodes and methods the suite uses.
DATASETS = {"ham10000": REPO / "configs/ham10000.yaml", "pbc": REPO / "configs/pbc.yaml"}
#: A smoke run: minutes on 2 cores; its numbers mean nothing.
QUICK_OVERRIDES = (
    "pretrain.epochs=1",
    "pretrain.steps_per_epoch=4",
    "pretrain.warmup_epochs=0",
    "meta_train.enabled=false",
    "methods=[{name: simpleshot}, {name: logreg, search: {features: [l2, raw]}}, {name: bd_cspn}]",
    "episodes.shots=[1, 5]",
    "episodes.n_test_episodes=12",
    "episodes.n_val_episodes=8",
)
#: Shots of the accuracy-against-shots curve (frozen-feature methods and the oracle).
CURVE_SHOTS = (1, 2, 3, 5, 10)
QUICK_CURVE_SHOTS = (1, 2, 5)
#: The suite's name (its MLflow runs and artifacts, ``fewshot_med.tracking.names``).
SUITE = "peers"
#: Peer libraries the suite runs (the ``bench`` extra).
REQUIRES = ("easyfsl", "netcal")
#: Shots of the val episodes on which each peer's feature preprocessing is chosen.
SELECTION_SHOTS = 5
#: The class-imbalanced query test: Dirichlet concentration of the query proportions (Veilleux,
#: Boudiaf, Piantanida & Ben Ayed, NeurIPS 2021) and the K it runs at (the largest K below if absent).
IMBALANCE_ALPHA = 2.0
IMBALANCE_SHOTS = 5
#: The comparisons of a setting -> the rows they take, by ``transductive``: our best against the best
#: peer of any kind, then like against like.
SIDES = {"any": (False, True), "inductive": (False,), "transductive": (True,)}


@dataclass
class PeerChoice:
    """A peer's preprocessing picked on val episodes (``val_accuracy``: mean per option, NaN when it
    failed on some episode) and the seconds the selection took."""

    preprocessing: str
    val_accuracy: dict[str, float]
    seconds: float


@dataclass
class DatasetBenchmark(Lineage):
    """Everything measured on one dataset, with its lineage."""

    ours: list[EpisodeResults] = field(default_factory=list)
    oracle: list[EpisodeResults] = field(default_factory=list)
    peers: list[EpisodeResults] = field(default_factory=list)
    peer_choices: dict[str, PeerChoice] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    curve: list[EpisodeResults] = field(default_factory=list)
    netcal: list[dict[str, float | str | int]] = field(default_factory=list)
    imbalanced: list[EpisodeResults] = field(default_factory=list)


@dataclass(frozen=True)
class Comparison:
    """Our best row against the best peer's in one setting: ``delta`` (accuracy, ours minus peer) and
    its 95% ``half_width``, paired over their ``episodes`` common episodes."""

    ours: EpisodeResults
    peer: EpisodeResults
    delta: float
    half_width: float
    episodes: int


def run(options: SuiteOptions) -> SuiteReport:
    """The peers suite on every dataset of ``options.configs`` (else of ``DATASETS``): tables,
    headline metrics, record and verdicts."""
    require_modules(REQUIRES)
    if options.threads:
        torch.set_num_threads(options.threads)
    datasets = dict(options.configs) or DATASETS
    benchmarks = [benchmark_dataset(name, path, options) for name, path in datasets.items()]
    report = SuiteReport(markdown=_suite_markdown(benchmarks, options.quick))
    for bench in benchmarks:
        report.record.update(bench.record())
        report.metrics.update(_headline_metrics(bench))
        report.verdicts[bench.name] = _verdicts(bench)
        report.tables[names.dataset_artifact(SUITE, bench.name, "csv")] = _rows_csv(bench)
        figure = names.dataset_artifact(names.ACCURACY_VS_SHOTS, bench.name, "png")
        report.figures[figure] = _curve_figure(bench)
    return report


def benchmark_dataset(name: str, config_path: Path, options: SuiteOptions) -> DatasetBenchmark:
    """Backbone, episodes, our methods, the oracle, the peers, the curve and the netcal comparison on
    the dataset of one pipeline config, under an MLflow run ``peers:<name>`` nested in the suite's run."""
    with open_dataset(SUITE, name, config_path, options, QUICK_OVERRIDES) as opened:
        embedded, episodes = opened.embedded, opened.episodes
        subsets, features, context = embedded.subsets, embedded.features, embedded.methods
        bench = DatasetBenchmark(**opened.lineage.lineage())
        validation = _evaluate_ours(bench, context, features, subsets, episodes)
        bench.oracle = evaluate_oracle_rows(features, subsets, episodes, bench.config.evaluation)
        _evaluate_peers(bench, context, features, subsets, episodes)
        bench.imbalanced = _imbalanced_queries(bench, context, features, subsets, episodes)
        bench.curve = _accuracy_against_shots(bench, context, features, subsets, episodes, options.quick)
        bench.netcal = _netcal_comparison(bench, validation)
        tracking.log_text_artifact(_dataset_markdown(bench), names.suite_artifact(SUITE, "md"))
        tracking.log_text_artifact(_rows_csv(bench), names.suite_artifact(SUITE, "csv"))
        tracking.log_metrics(_headline_metrics(bench))
    return bench


def _evaluate_ours(
    bench: DatasetBenchmark,
    context: MethodContext,
    features: dict[str, torch.Tensor],
    subsets: dict,
    episodes: Episodes,
) -> dict[tuple[str, int], EpisodeResults]:
    """Every method of the config, as the pipeline's evaluate stage runs it; returns the val results."""
    validation: dict[tuple[str, int], EpisodeResults] = {}
    for method in bench.config.methods:
        start = time.perf_counter()
        results, _, val = evaluate_method(method, context, features, subsets, episodes, bench.config)
        bench.seconds[method.display_name] = time.perf_counter() - start
        bench.ours += results
        validation.update(val)
    return validation


def _evaluate_peers(
    bench: DatasetBenchmark,
    context: MethodContext,
    features: dict[str, torch.Tensor],
    subsets: dict,
    episodes: Episodes,
) -> None:
    """Each peer: preprocessing chosen on the val episodes, then every K's test episodes."""
    if episodes.val is None:
        raise ValueError("the peers suite needs val episodes: keep val_temperature in evaluation.calibration")
    val_episodes = episodes.val[
        max((k for k in episodes.val if k <= SELECTION_SHOTS), default=min(episodes.val))
    ]
    centring = context.base_feature_mean
    for label, peer in PEERS.items():
        choice = _choose_preprocessing(
            peer, centring, features["novel_val"], subsets["novel_val"], val_episodes
        )
        bench.peer_choices[label] = choice
        centre, normalise = PREPROCESSING[choice.preprocessing]
        classify = peer.make(centring if centre else None, normalise)
        start = time.perf_counter()
        for test_episodes in episodes.test.values():
            bench.peers.append(
                evaluate_episodewise(
                    classify,
                    features["novel_test"],
                    subsets["novel_test"],
                    test_episodes,
                    label=label,
                    coverage=bench.config.evaluation.coverage,
                    n_bins=bench.config.evaluation.ece_bins,
                )
            )
        bench.seconds[label] = time.perf_counter() - start


def _imbalance_shots(episodes: Episodes) -> int:
    return max((k for k in episodes.test if k <= IMBALANCE_SHOTS), default=min(episodes.test))


def _imbalanced_queries(
    bench: DatasetBenchmark,
    context: MethodContext,
    features: dict[str, torch.Tensor],
    subsets: dict,
    episodes: Episodes,
) -> list[EpisodeResults]:
    """Our frozen-feature methods (with what their search chose) and every peer (with its chosen
    preprocessing), uncalibrated, on test episodes of the same K, seed and total query count whose
    queries are split across classes by Dirichlet(``IMBALANCE_ALPHA``) proportions."""
    k = _imbalance_shots(episodes)
    pool = subsets["novel_test"]
    drawn = draw_episodes(
        bench.config,
        {"test": pool},
        episodes.test[k].n_way,
        [k],
        val=False,
        query_dirichlet_alpha=IMBALANCE_ALPHA,
    ).test[k]
    scoring = {"coverage": bench.config.evaluation.coverage, "n_bins": bench.config.evaluation.ece_bins}
    results = []
    for method in bench.config.methods:
        balanced = next(
            (
                r
                for r in bench.ours
                if r.method == method.display_name and r.k_shot == k and r.calibration == "none"
            ),
            None,
        )
        if METHODS[method.name].inputs != "features" or balanced is None:
            continue
        factory = partial(create_method, method.name, context, **method.params, **balanced.params)
        results.append(
            evaluate_frozen(
                factory, features["novel_test"], pool, drawn, label=method.display_name, **scoring
            )
        )
    centring = context.base_feature_mean
    for label, peer in PEERS.items():
        centre, normalise = PREPROCESSING[bench.peer_choices[label].preprocessing]
        classify = peer.make(centring if centre else None, normalise)
        results.append(
            evaluate_episodewise(classify, features["novel_test"], pool, drawn, label=label, **scoring)
        )
    return results


def _choose_preprocessing(
    peer: Peer, centring: torch.Tensor, features: torch.Tensor, pool: object, episodes: EpisodeList
) -> PeerChoice:
    """The preprocessing with the best mean val accuracy among those that never failed."""
    start, scores = time.perf_counter(), {}
    for name, (centre, normalise) in PREPROCESSING.items():
        classify = peer.make(centring if centre else None, normalise)
        results = evaluate_episodewise(classify, features, pool, episodes, label=peer.label)
        scores[name] = float("nan") if results.n_failed else results.summary()["accuracy"][0]
    finite = {name: score for name, score in scores.items() if np.isfinite(score)}
    chosen = max(finite, key=finite.__getitem__) if finite else "l2"
    return PeerChoice(chosen, scores, time.perf_counter() - start)


def _accuracy_against_shots(
    bench: DatasetBenchmark,
    context: MethodContext,
    features: dict[str, torch.Tensor],
    subsets: dict,
    episodes: Episodes,
    quick: bool,
) -> list[EpisodeResults]:
    """Uncalibrated frozen-feature methods and the oracle at every curve K (test episodes of the
    protocol where they exist, else drawn with the same seed)."""
    pool = subsets["novel_test"]
    frozen = [m for m in bench.config.methods if METHODS[m.name].inputs == "features"]
    curve = []
    for k in QUICK_CURVE_SHOTS if quick else CURVE_SHOTS:
        if k in episodes.test:
            curve += [r for r in bench.ours + bench.oracle if r.k_shot == k and r.calibration == "none"]
            continue
        drawn = draw_episodes(bench.config, {"test": pool}, len(pool.class_names), [k], val=False).test[k]
        for method in frozen:
            factory = lambda method=method: create_method(method.name, context, **method.params)  # noqa: E731
            curve.append(
                evaluate_frozen(factory, features["novel_test"], pool, drawn, label=method.display_name)
            )
        curve += evaluate_oracle_rows(features, subsets, Episodes({k: drawn}, None), bench.config.evaluation)
    return [r for r in curve if r.method == "oracle" or r.method in {m.display_name for m in frozen}]


def _netcal_comparison(
    bench: DatasetBenchmark, validation: dict[tuple[str, int], EpisodeResults]
) -> list[dict[str, float | str | int]]:
    """Temperature scaling here and netcal's, fitted on the same pooled val-episode logits of each
    frozen-feature method and K, scored on its test episodes."""
    from netcal.metrics import ECE
    from netcal.scaling import TemperatureScaling as NetcalTemperatureScaling

    settings = bench.config.evaluation
    t_min, t_max = settings.temperature_bounds
    rows = []
    for result in bench.ours:
        val = validation.get((result.method, result.k_shot))
        if result.calibration != "none" or val is None:
            continue
        n_classes = result.logits.shape[-1]
        fit_logits, fit_labels = val.logits.reshape(-1, n_classes), val.labels.ravel()
        start = time.perf_counter()
        ours = TemperatureScaling(t_min=t_min, t_max=t_max).fit(fit_logits, fit_labels)
        ours_seconds = time.perf_counter() - start
        start = time.perf_counter()
        netcal = NetcalTemperatureScaling()
        netcal.fit(softmax(fit_logits), fit_labels, tensorboard=False)
        netcal_seconds = time.perf_counter() - start
        test_logits = result.logits.reshape(-1, n_classes)
        netcal_probs = np.asarray(netcal.transform(softmax(test_logits)), dtype=np.float64)
        netcal_logits = np.log(np.clip(netcal_probs, 1e-12, None)).reshape(result.logits.shape)
        ours_scored = result.with_logits(ours.transform(test_logits).reshape(result.logits.shape), "ours", {})
        netcal_scored = result.with_logits(netcal_logits, "netcal", {})
        raw_probs = softmax(test_logits)
        rows.append(
            {
                "method": result.method,
                "k_shot": result.k_shot,
                "ece_raw": result.summary()["ece_pooled"][0],
                "ece_ours": ours_scored.summary()["ece_pooled"][0],
                "ece_netcal": netcal_scored.summary()["ece_pooled"][0],
                "nll_raw": result.summary()["nll"][0],
                "nll_ours": ours_scored.summary()["nll"][0],
                "nll_netcal": netcal_scored.summary()["nll"][0],
                "temperature_ours": ours.temperature_,
                "fit_ms_ours": 1000 * ours_seconds,
                "fit_ms_netcal": 1000 * netcal_seconds,
                "ece_metric_gap": abs(
                    float(ece(raw_probs, result.labels.ravel(), settings.ece_bins))
                    - float(ECE(bins=settings.ece_bins).measure(raw_probs, result.labels.ravel()))
                ),
            }
        )
    return rows


# ----------------------------------------------------------------------------------------------------
# Tables


def _best(results: list[EpisodeResults]) -> EpisodeResults | None:
    """The result with the highest mean test accuracy among those that never failed."""
    usable = [r for r in results if r.n_failed == 0]
    return max(usable, key=lambda r: r.summary()["accuracy"][0]) if usable else None


def _on_all_episodes(bench: DatasetBenchmark, results: list[EpisodeResults]) -> list[EpisodeResults]:
    """The results scored on every test episode (fine-tuning methods run on the first N only: picking
    "our best" among rows of different sizes would favour the noisier ones)."""
    return [r for r in results if len(r) == bench.config.episodes.n_test_episodes]


def _transductive(bench: DatasetBenchmark, kind: str, result: EpisodeResults) -> bool:
    """Whether a row's method reads the episode's queries: the peer's ``Peer.transductive``, our
    method's registry class's ``transductive``; never the oracle."""
    if kind == "peer":
        return PEERS[result.method].transductive
    if kind == "ours":
        method = next(m for m in bench.config.methods if m.display_name == result.method)
        return METHODS[method.name].transductive
    return False


def _compare(ours: list[EpisodeResults], peers: list[EpisodeResults]) -> Comparison | None:
    """The best of ``ours`` against the best of ``peers``; ``None`` when a side has no usable row."""
    best_ours, best_peer = _best(ours), _best(peers)
    if best_ours is None or best_peer is None:
        return None
    episodes = min(len(best_ours), len(best_peer))
    return Comparison(best_ours, best_peer, *paired_on_common_episodes(best_ours, best_peer), episodes)


def _comparisons(bench: DatasetBenchmark, k: int) -> dict[str, Comparison | None]:
    """Per side of ``SIDES``, our best at ``k`` (among rows on every test episode) against the best
    peer: of any kind, inductive against inductive, transductive against transductive."""
    rows = _setting_rows(bench, k)
    ours = _on_all_episodes(bench, [r for kind, r, _ in rows if kind == "ours"])
    ours_kinds = [(r, _transductive(bench, "ours", r)) for r in ours]
    peer_kinds = [(r, _transductive(bench, "peer", r)) for kind, r, _ in rows if kind == "peer"]
    return {
        side: _compare([r for r, t in ours_kinds if t in kinds], [r for r, t in peer_kinds if t in kinds])
        for side, kinds in SIDES.items()
    }


def _settings(bench: DatasetBenchmark) -> list[int]:
    return sorted({r.k_shot for r in bench.peers})


def _calibrated(bench: DatasetBenchmark, result: EpisodeResults) -> EpisodeResults | None:
    return next(
        (
            r
            for r in bench.ours + bench.oracle
            if r.method == result.method and r.k_shot == result.k_shot and r.calibration == "val_temperature"
        ),
        None,
    )


def _cell(mean: float, half_width: float, digits: int = 1, scale: float = 100.0) -> str:
    if not np.isfinite(mean):
        return "NaN"
    return f"{scale * mean:.{digits}f} ± {scale * half_width:.{digits}f}"


def _setting_rows(bench: DatasetBenchmark, k: int) -> list[tuple[str, EpisodeResults, EpisodeResults | None]]:
    """``(kind, raw, calibrated)`` rows of one K: ours, the oracle, then the peers."""
    raw = [r for r in bench.ours + bench.oracle if r.k_shot == k and r.calibration == "none"]
    rows = [("oracle" if r.method == "oracle" else "ours", r, _calibrated(bench, r)) for r in raw]
    return rows + [("peer", r, None) for r in bench.peers if r.k_shot == k]


def _dataset_markdown(bench: DatasetBenchmark) -> str:
    """Tables and notes of one dataset."""
    config = bench.config
    classes = ", ".join(config.roles().novel)
    lines = [
        f"### {bench.name}: {classes} ({len(config.roles().novel)}-way, test split)",
        "",
        f"- Backbone: {config.model.backbone}, {bench.backbone_source}. "
        f"Data sha256 `{bench.data_digest[:16]}…`.",
        f"- Episodes: {config.episodes.n_test_episodes} per K, {config.episodes.n_query} queries per class "
        f"(capped by the split), {bench.episode_source}; sha256 "
        + ", ".join(f"K={k} `{d[:12]}`" for k, d in bench.episode_digests.items())
        + ".",
        f"- Dataset run: MLflow `{bench.run_id}` (experiment `benchmarks`, nested in the suite run).",
        "",
    ]
    for k in _settings(bench):
        lines += _setting_table(bench, k)
    lines += _imbalance_table(bench)
    lines += _search_table(bench)
    lines += _peer_choice_table(bench)
    lines += _netcal_table(bench)
    lines += _curve_table(bench)
    lines += _cost_table(bench)
    return "\n".join(lines)


def _setting_table(bench: DatasetBenchmark, k: int) -> list[str]:
    rows = _setting_rows(bench, k)
    comparisons = _comparisons(bench, k)
    best_peer = _best([r for kind, r, _ in rows if kind == "peer"])
    lines = [
        f"#### {bench.name}, K = {k}",
        "",
        "| method | transductive | features / calibration | accuracy | balanced acc. | ECE | ECE calibrated "
        "| NLL | NLL calibrated | Δ accuracy vs best peer |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for kind, raw, calibrated in rows:
        summary = raw.summary()
        transductive = "yes" if _transductive(bench, kind, raw) else "no"
        if kind == "peer":
            name = raw.method
            how = bench.peer_choices[raw.method].preprocessing
        else:
            name = f"**{raw.method}**" if kind == "ours" else "oracle (all novel train images)"
            how = "val temperature" if calibrated is not None else "none"
        if len(raw) < bench.config.episodes.n_test_episodes:
            name += f" (first {len(raw)} episodes)"
        cal = calibrated.summary() if calibrated is not None else None
        if raw.n_failed:
            name += f" — failed on {raw.n_failed} episodes"
        delta = (
            "—"
            if best_peer is None or raw is best_peer
            else _cell(*paired_on_common_episodes(raw, best_peer))
        )
        lines.append(
            f"| {name} | {transductive} | {how} | {_cell(*summary['accuracy'])} "
            f"| {_cell(*summary['balanced_accuracy'])} "
            f"| {_cell(*summary.get('ece_pooled', (np.nan, np.nan)), digits=3, scale=1)} "
            f"| {_cell(*cal['ece_pooled'], digits=3, scale=1) if cal else '—'} "
            f"| {_cell(*summary['nll'], digits=3, scale=1)} "
            f"| {_cell(*cal['nll'], digits=3, scale=1) if cal else '—'} | {delta} |"
        )
    lines += ["", _verdict(bench, k, comparisons), ""]
    return lines


def _verdict(bench: DatasetBenchmark, k: int, comparisons: dict[str, Comparison | None]) -> str:
    """One sentence per setting: who wins accuracy (paired CI), of any kind then like against like,
    and calibration (pooled ECE)."""
    best = comparisons["any"]
    if best is None:
        return "No comparison: a side has no usable result."
    ours, peer, mean, half = best.ours.method, best.peer.method, best.delta, best.half_width
    if mean - half > 0:
        accuracy = f"**ours wins**: {ours} is ahead of {peer}"
    elif mean + half < 0:
        accuracy = f"**the peer wins**: {peer} is ahead of our best, {ours},"
    else:
        accuracy = f"**no significant difference** between {ours} and {peer}"
    text = (
        f"K = {k}: accuracy: {accuracy} (ours minus peer {_cell(mean, half)} points, paired over "
        f"{best.episodes} episodes)"
    )
    for side, like in comparisons.items():
        if side != "any" and like is not None:
            text += (
                f"; {side} against {side}: {like.ours.method} minus {like.peer.method} "
                f"{_cell(like.delta, like.half_width)}"
            )
    calibrated = [c for _, r, c in _setting_rows(bench, k) if c is not None and r.method != "oracle"]
    peers = [r for r in bench.peers if r.k_shot == k and r.n_failed == 0]
    if calibrated and peers:
        ours_ece = min(calibrated, key=lambda r: r.summary()["ece_pooled"][0])
        peer_ece = min(peers, key=lambda r: r.summary()["ece_pooled"][0])
        a, b = ours_ece.summary()["ece_pooled"][0], peer_ece.summary()["ece_pooled"][0]
        winner = "ours" if a < b else "the peer"
        text += (
            f". Calibration: lowest pooled ECE {a:.3f} ({ours_ece.method}, val temperature) against "
            f"{b:.3f} ({peer_ece.method}); {winner} lower"
        )
    return text + "."


def _imbalance_table(bench: DatasetBenchmark) -> list[str]:
    """Balanced against Dirichlet-imbalanced queries, per method (uncalibrated accuracy)."""
    if not bench.imbalanced:
        return []
    k = bench.imbalanced[0].k_shot
    lines = [
        f"#### {bench.name}: class-imbalanced queries, K = {k}",
        "",
        f"The same number of queries per episode, split across classes by Dirichlet({IMBALANCE_ALPHA:g}) "
        "proportions (Veilleux et al., NeurIPS 2021), on episodes drawn with the same seed; balanced "
        "accuracy weighs each class equally. Change: imbalanced minus balanced accuracy (different query "
        "sets, so unpaired).",
        "",
        "| method | transductive | accuracy, balanced queries | accuracy, imbalanced | change "
        "| balanced acc., imbalanced |",
        "|---|---|---|---|---|---|",
    ]
    for result in bench.imbalanced:
        kind = "peer" if result.method in PEERS else "ours"
        balanced = next(
            (
                r
                for r in bench.ours + bench.peers
                if r.method == result.method and r.k_shot == k and r.calibration == "none"
            ),
            None,
        )
        before, after = balanced.summary()["accuracy"], result.summary()["accuracy"]
        name = result.method if kind == "peer" else f"**{result.method}**"
        if result.n_failed:
            name += f" — failed on {result.n_failed} episodes"
        lines.append(
            f"| {name} | {'yes' if _transductive(bench, kind, result) else 'no'} | {_cell(*before)} "
            f"| {_cell(*after)} "
            f"| {100 * (after[0] - before[0]):+.1f} | {_cell(*result.summary()['balanced_accuracy'])} |"
        )
    return [*lines, ""]


def _search_table(bench: DatasetBenchmark) -> list[str]:
    """What each of our searched methods chose per K on the val episodes, with every combination's
    mean val accuracy."""
    searched = [r for r in bench.ours if r.calibration == "none" and r.search_scores]
    if not searched:
        return []
    lines = [
        f"#### {bench.name}: our hyperparameters, chosen on val episodes",
        "",
        "| method | K | chosen | val accuracy of each combination |",
        "|---|---|---|---|",
    ]
    for result in searched:
        chosen = ", ".join(f"{name}={value}" for name, value in result.params.items())
        tried = "; ".join(
            f"{', '.join(f'{n}={v}' for n, v in combination.items())}: {_cell(accuracy, 0.0).split(' ±')[0]}"
            for combination, accuracy in result.search_scores
        )
        lines.append(f"| {result.method} | {result.k_shot} | {chosen} | {tried} |")
    return [*lines, ""]


def _peer_choice_table(bench: DatasetBenchmark) -> list[str]:
    names = list(PREPROCESSING)
    lines = [
        f"#### {bench.name}: peer feature preprocessing, chosen on val episodes",
        "",
        "| peer | " + " | ".join(f"val accuracy, {n}" for n in names) + " | chosen |",
        "|---|" + "---|" * (len(names) + 1),
    ]
    for label, choice in bench.peer_choices.items():
        cells = " | ".join(_cell(choice.val_accuracy[n], 0.0).split(" ±")[0] for n in names)
        lines.append(f"| {label} | {cells} | {choice.preprocessing} |")
    return [*lines, "", "NaN: the peer failed (non-finite output) on at least one val episode.", ""]


def _netcal_table(bench: DatasetBenchmark) -> list[str]:
    lines = [
        f"#### {bench.name}: temperature scaling here vs netcal, same logits",
        "",
        "Both fitted on the pooled val-episode logits of the method and K, scored on the test episodes.",
        "",
        "| method | K | ECE raw | ECE ours | ECE netcal | NLL raw | NLL ours | NLL netcal | T ours "
        "| fit ms ours | fit ms netcal |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in bench.netcal:
        lines.append(
            f"| {row['method']} | {row['k_shot']} | {row['ece_raw']:.3f} | {row['ece_ours']:.3f} "
            f"| {row['ece_netcal']:.3f} | {row['nll_raw']:.3f} | {row['nll_ours']:.3f} "
            f"| {row['nll_netcal']:.3f} | {row['temperature_ours']:.3f} | {row['fit_ms_ours']:.1f} "
            f"| {row['fit_ms_netcal']:.1f} |"
        )
    if bench.netcal:
        gap = max(float(row["ece_metric_gap"]) for row in bench.netcal)
        lines += [
            "",
            f"Our top-label ECE and netcal's `ECE(bins=15)` on the same probabilities differ by at most "
            f"{gap:.1e}.",
        ]
    return [*lines, ""]


def _curve_table(bench: DatasetBenchmark) -> list[str]:
    shots = sorted({r.k_shot for r in bench.curve})
    lines = [
        f"#### {bench.name}: accuracy against shots, and the oracle",
        "",
        "| K | best of ours (uncalibrated) | accuracy | best peer | accuracy | oracle | ours / oracle |",
        "|---|---|---|---|---|---|---|",
    ]
    for k in shots:
        ours = _best([r for r in bench.curve if r.k_shot == k and r.method != "oracle"])
        oracle = next(r for r in bench.curve if r.k_shot == k and r.method == "oracle")
        peer = _best([r for r in bench.peers if r.k_shot == k])
        oracle_accuracy = oracle.summary()["accuracy"]
        ratio = ours.summary()["accuracy"][0] / oracle_accuracy[0] if ours else float("nan")
        peer_cells = f"{peer.method} | {_cell(*peer.summary()['accuracy'])}" if peer else "— | —"
        lines.append(
            f"| {k} | {ours.method if ours else '—'} | {_cell(*ours.summary()['accuracy']) if ours else '—'} "
            f"| {peer_cells} | {_cell(*oracle_accuracy)} | {100 * ratio:.0f}% |"
        )
    return [
        *lines,
        "",
        "Oracle: logistic regression on all the train split's novel-class images, scored on each "
        "episode's queries.",
        "",
    ]


def _cost_table(bench: DatasetBenchmark) -> list[str]:
    n_settings = len(_settings(bench))
    lines = [
        f"#### {bench.name}: wall time of the comparison",
        "",
        "| method | seconds | what it covers |",
        "|---|---|---|",
    ]
    for label, seconds in bench.seconds.items():
        if label in PEERS:
            choosing = bench.peer_choices[label].seconds
            what = f"test episodes of {n_settings} K, one at a time (+{choosing:.0f} s choosing on val)"
        else:
            what = f"test and val episodes of {n_settings} K, calibrators included"
        lines.append(f"| {label} | {seconds:.1f} | {what} |")
    return [*lines, ""]


def _suite_markdown(benchmarks: list[DatasetBenchmark], quick: bool) -> str:
    lines = [
        "## Peers: accuracy and calibration on identical episodes",
        "",
    ]
    if quick:
        lines += ["**Quick mode: tiny training and few episodes; these numbers mean nothing.**", ""]
    lines += [
        "Every row of a table ran on the same backbone features and the same saved test episodes. "
        "Accuracy, balanced accuracy and NLL are means over episodes with 95% CIs; ECE is the pooled "
        "top-label ECE (15 bins) of all test queries, with a bootstrap CI over episodes (per-episode "
        "ECE of 45 queries has a floor near 0.16, see docs/evaluation.md). Δ is the paired difference "
        "in accuracy points against the best peer of the setting, on the same episodes. A transductive "
        "method, ours or a peer, also reads the episode's queries (all of them at once) while it "
        "adapts; each verdict compares our best with the best peer of any kind, then inductive with "
        "inductive and transductive with transductive where both sides have one. Peers run with their "
        "library defaults; only their feature preprocessing is chosen, on val episodes.",
        "",
    ]
    for bench in benchmarks:  # marked per dataset: a run on some datasets keeps the others' blocks
        lines += [names.dataset_block(bench.name, _dataset_markdown(bench)), ""]
    return "\n".join(lines)


def _rows_csv(bench: DatasetBenchmark) -> str:
    """Every row of every setting with its summary metrics, as CSV."""
    header = ["dataset", "k_shot", "method", "kind", "calibration", "episodes", "failed"]
    metrics = ["accuracy", "balanced_accuracy", "ece_pooled", "nll", "brier", "macro_auroc"]
    lines = [",".join([*header, *(f"{m}{s}" for m in metrics for s in ("", "_ci95"))])]
    for k in _settings(bench):
        for kind, raw, calibrated in _setting_rows(bench, k):
            for result in filter(None, (raw, calibrated)):
                summary = result.summary()
                values = [f"{v:.6g}" for m in metrics for v in summary.get(m, (np.nan, np.nan))]
                cells = [
                    bench.name,
                    str(k),
                    result.method,
                    kind,
                    result.calibration,
                    str(len(result)),
                    str(result.n_failed),
                ]
                lines.append(",".join([*cells, *values]))
    return "\n".join(lines) + "\n"


def _headline_metrics(bench: DatasetBenchmark) -> dict[str, float]:
    metrics = {}
    for k in _settings(bench):
        best = _comparisons(bench, k)["any"]
        if best is None:
            continue
        values = {
            "best_ours_accuracy": best.ours.summary()["accuracy"][0],
            "best_peer_accuracy": best.peer.summary()["accuracy"][0],
            "delta_accuracy": best.delta,
            names.ci95("delta_accuracy"): best.half_width,
        }
        metrics |= {names.benchmark_metric(bench.name, k, field): value for field, value in values.items()}
    return metrics


def _verdicts(bench: DatasetBenchmark) -> list[dict[str, object]]:
    """One JSON object per K: our best (on every test episode) against the best peer of any kind,
    accuracies and paired ``delta`` with its 95% CI in percent points, our best's pooled ECE after its
    val temperature (``None`` without one), and the like-against-like comparisons (``None`` where a
    side has no row)."""
    verdicts = []
    for k in _settings(bench):
        comparisons = _comparisons(bench, k)
        best = comparisons["any"]
        if best is None:
            continue
        calibrated = _calibrated(bench, best.ours)
        ece_pooled = calibrated.summary()["ece_pooled"][0] if calibrated is not None else np.nan
        verdicts.append(
            {
                "dataset": bench.name,
                "shots": k,
                "ours_method": best.ours.method,
                "ours_accuracy": _json_number(best.ours.summary()["accuracy"][0], 100),
                "ours_ece_pooled": _json_number(ece_pooled),
                "best_peer": best.peer.method,
                "best_peer_accuracy": _json_number(best.peer.summary()["accuracy"][0], 100),
                **_json_delta(best),
                "ours_transductive": _transductive(bench, "ours", best.ours),
                "best_peer_transductive": _transductive(bench, "peer", best.peer),
                "episodes": best.episodes,
                "run_id": bench.run_id,
                "inductive": _json_like(comparisons["inductive"]),
                "transductive": _json_like(comparisons["transductive"]),
            }
        )
    return verdicts


def _json_like(comparison: Comparison | None) -> dict[str, object] | None:
    """A like-against-like comparison: the two methods, ``delta`` and ``delta_ci95``."""
    if comparison is None:
        return None
    return {
        "ours_method": comparison.ours.method,
        "best_peer": comparison.peer.method,
        **_json_delta(comparison),
    }


def _json_delta(comparison: Comparison) -> dict[str, object]:
    """``delta`` and ``delta_ci95`` (``[low, high]``) of a comparison, in percent points."""
    low, high = comparison.delta - comparison.half_width, comparison.delta + comparison.half_width
    return {
        "delta": _json_number(comparison.delta, 100),
        "delta_ci95": [_json_number(low, 100), _json_number(high, 100)],
    }


def _json_number(value: float, scale: float = 1.0) -> float | None:
    """``scale * value`` rounded to 6 decimals for JSON; ``None`` when not finite."""
    return round(float(scale * value), 6) if np.isfinite(value) else None


def _curve_figure(bench: DatasetBenchmark):
    from fewshot_med.evaluation.plots import accuracy_vs_shots_figure

    rows = [(r.method, r.k_shot, *r.summary()["accuracy"]) for r in bench.curve]
    for k in _settings(bench):
        peer = _best([r for r in bench.peers if r.k_shot == k])
        if peer is not None:
            rows.append(("best peer", k, *peer.summary()["accuracy"]))
    return accuracy_vs_shots_figure(rows, title=f"{bench.name}: test accuracy against shots (95% CI)")
