"""A quick peers run on any pipeline config (the quickstart's demo data, no real data needed), checked
through its JSON verdicts, document and MLflow; and the like-against-like verdicts of its tables."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from benchmarks import run
from benchmarks.suites import peers
from benchmarks.suites.peer_methods import PEERS

QUICKSTART = Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"
#: Keys every verdict holds, with their JSON types (``None``: the value may be null).
VERDICT_TYPES = {
    "dataset": (str,),
    "shots": (int,),
    "ours_method": (str,),
    "ours_accuracy": (float,),
    "ours_ece_pooled": (float, type(None)),
    "best_peer": (str,),
    "best_peer_accuracy": (float,),
    "delta": (float,),
    "delta_ci95": (list,),
}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[peers.DatasetBenchmark]]:
    """``--suite peers --quick --config configs/quickstart.yaml`` run once: its folder and benchmarks."""
    pytest.importorskip("easyfsl", reason="the peers suite needs the bench extra: pip install -e '.[bench]'")
    pytest.importorskip("netcal", reason="the peers suite needs the bench extra: pip install -e '.[bench]'")
    folder = tmp_path_factory.mktemp("peers_quick")
    benchmarks: list[peers.DatasetBenchmark] = []
    benchmark_dataset = peers.benchmark_dataset

    def kept(*args: object) -> peers.DatasetBenchmark:
        benchmarks.append(benchmark_dataset(*args))
        return benchmarks[-1]

    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        patch.setattr(peers, "benchmark_dataset", kept)
        argv = ["--suite", "peers", "--quick", "--threads", "1", "--config", str(QUICKSTART)]
        assert run.main([*argv, "--output", "bench.md"]) == 0
    return folder, benchmarks


@pytest.mark.slow
def test_verdicts_json_has_the_keys_types_and_paired_deltas(quick_run):
    folder, _ = quick_run
    document = json.loads((folder / "bench.json").read_text())
    assert list(document) == ["peers"]
    verdicts = document["peers"]
    assert [(v["dataset"], v["shots"]) for v in verdicts] == [("quickstart", 1), ("quickstart", 5)]
    for verdict in verdicts:
        for key, types in VERDICT_TYPES.items():
            assert isinstance(verdict[key], types), (key, verdict[key])
        assert verdict["best_peer"] in PEERS and verdict["ours_method"] in {"simpleshot", "logreg", "bd_cspn"}
        assert 0 <= verdict["ours_accuracy"] <= 100 and 0 <= verdict["best_peer_accuracy"] <= 100
        # ours and the peer ran on the same 12 episodes: the paired mean is the difference of the means
        assert verdict["episodes"] == 12
        assert verdict["delta"] == pytest.approx(
            verdict["ours_accuracy"] - verdict["best_peer_accuracy"], abs=1e-4
        )
        low, high = verdict["delta_ci95"]
        assert low <= verdict["delta"] <= high
        assert verdict["transductive"]["ours_method"] == "bd_cspn"  # the quick run's one transductive method
        assert verdict["inductive"]["ours_method"] in {"simpleshot", "logreg"}

    client = MlflowClient(f"sqlite:///{folder / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("benchmarks")
    (suite,) = client.search_runs([experiment.experiment_id], "attributes.run_name = 'peers-quick'")
    logged = client.download_artifacts(suite.info.run_id, "peers.json", str(folder / "downloaded"))
    assert json.loads(Path(logged).read_text()) == document


@pytest.mark.slow
def test_any_config_is_benchmarked_under_its_name(quick_run):
    folder, _ = quick_run
    text = (folder / "bench.md").read_text()
    assert "#### quickstart, K = 1" in text and "#### quickstart, K = 5" in text
    # a row per K, and one in the imbalanced-query table
    assert text.count("| **simpleshot** | no |") == 3 and text.count("| easyfsl TIM | yes |") == 3
    assert "Our methods are inductive" not in text
    # the imbalanced-query test runs our frozen methods and every peer; the search shows its val evidence
    imbalanced = text[text.index("#### quickstart: class-imbalanced queries, K = 5") :]
    assert "| **bd_cspn** | yes |" in imbalanced and "| easyfsl PT-MAP | yes |" in imbalanced
    search = text[text.index("#### quickstart: our hyperparameters, chosen on val episodes") :]
    assert "| logreg | 1 | features=" in search and "features=l2: " in search and "features=raw: " in search
    assert "*Regenerate:* `python -m benchmarks.run --suite peers --quick --threads 1 --config " in text


@pytest.mark.slow
def test_our_transductive_rows_are_compared_like_against_like(quick_run):
    _, (bench,) = quick_run
    table = "\n".join(peers._setting_table(bench, 5))
    assert "| **bd_cspn** | yes |" in table and "| **simpleshot** | no |" in table

    transductive_peers = [r for r in bench.peers if r.k_shot == 5 and PEERS[r.method].transductive]
    best_transductive = peers._best(transductive_peers)
    verdict = next(v for v in peers._verdicts(bench) if v["shots"] == 5)
    assert verdict["transductive"]["ours_method"] == "bd_cspn"
    assert verdict["transductive"]["best_peer"] == best_transductive.method
    assert not PEERS[verdict["inductive"]["best_peer"]].transductive
    assert f"transductive against transductive: bd_cspn minus {best_transductive.method} " in table
    assert "inductive against inductive: " in table
