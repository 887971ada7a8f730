"""Write a pipeline run's results table into the docs, with the lineage needed to rerun it.

Run: ``python -m benchmarks.results_table RUN_ID [--out docs/results.md]`` after
``fewshot-med run configs/<dataset>.yaml``. The section for the run's experiment is replaced (or
added); other sections stay.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from mlflow import MlflowClient

from fewshot_med import tracking


def _lowest_pooled_ece(metrics: dict[str, float]) -> str:
    """Per (method, K) on the pipeline run: the calibration with the lowest pooled test ECE."""
    found: dict[tuple[str, int], dict[str, tuple[float, float]]] = {}
    pattern = re.compile(r"^test\.(\d+)shot\.(.+?)(?:\.(val_temperature|loo_temperature))?\.ece_pooled$")
    for key, value in metrics.items():
        match = pattern.match(key)
        if match:
            k_shot, method, calibration = int(match[1]), match[2], match[3] or "none"
            found.setdefault((method, k_shot), {})[calibration] = (value, metrics[f"{key}_ci95"])
    lines = [
        "| method | K | lowest ece_pooled | ece_pooled | uncalibrated ece_pooled |",
        "|---|---|---|---|---|",
    ]
    order = list(dict.fromkeys(method for method, _ in found))
    for method, k_shot in sorted(found, key=lambda key: (order.index(key[0]), key[1])):
        values = found[method, k_shot]
        best = min(values, key=lambda name: values[name][0])
        raw = values.get("none", (float("nan"), float("nan")))
        lines.append(
            f"| {method} | {k_shot} | {best} | {values[best][0]:.3f} ± {values[best][1]:.3f} "
            f"| {raw[0]:.3f} ± {raw[1]:.3f} |"
        )
    return "\n".join(lines)


def section(run_id: str) -> tuple[str, str]:
    """``(experiment name, markdown section)`` for a finished pipeline run."""
    client = MlflowClient(tracking.store_uri())
    run = client.get_run(run_id)
    experiment = client.get_experiment(run.info.experiment_id).name
    evaluate = tracking.find_stage_run(run_id, "evaluate")
    if evaluate is None:
        raise SystemExit(f"run {run_id} has no finished evaluate stage")
    table = Path(client.download_artifacts(evaluate, "results.md")).read_text().strip()
    table = re.sub(
        r"Lowest (pooled )?test ECE per method and K:\n\n.*?\n\n",
        lambda _: (
            "Lowest pooled test ECE per method and K:\n\n" + _lowest_pooled_ece(run.data.metrics) + "\n\n"
        ),
        table,
        flags=re.S,
    )
    tags, metrics = run.data.tags, run.data.metrics
    times = ", ".join(
        f"{key.removeprefix('time.').removesuffix('_seconds')} {value / 60:.1f} min"
        for key, value in sorted(metrics.items())
        if key.startswith("time.")
    )
    pretrain = tracking.find_stage_run(run_id, "pretrain")
    pretrain_metrics = client.get_run(pretrain).data.metrics if pretrain else {}
    meta = tracking.find_stage_run(run_id, "meta_train")
    meta_metrics = client.get_run(meta).data.metrics if meta else {}
    meta_line = (
        f"; after meta-training, 5-shot accuracy on novel val episodes "
        f"{100 * meta_metrics['meta_train.best_val_accuracy']:.1f}% "
        f"(episode {meta_metrics['meta_train.best_episode']:.0f})"
        if "meta_train.best_val_accuracy" in meta_metrics
        else ""
    )
    lines = [
        f"## {experiment}",
        "",
        f"- command: `fewshot-med run configs/{experiment}.yaml` (or `python -m benchmarks.pipeline_wall "
        f"configs/{experiment}.yaml`, the same run plus peak memory); config logged as `config.yaml`",
        f"- MLflow run `{run_id}`; git commit `{tags.get('git_commit', 'unknown')}`"
        f"{' (uncommitted changes)' if tags.get('git_dirty') == 'true' else ''}; seed {tags.get('seed')}",
        f"- data `{tags.get('data.source')}`, content digest sha256 `{tags.get('data.digest')}`",
        f"- backbone `{tags.get('backbone')}`; base-class val balanced accuracy after pretraining "
        f"{100 * pretrain_metrics.get('pretrain.best_val_balanced_accuracy', float('nan')):.1f}%{meta_line}",
        f"- wall time on this machine: {times}",
        "",
        "Mean ± 95% CI over episodes; accuracy, balanced accuracy, AUROC and accuracy at 80% coverage in %. "
        "`ece` is the mean per-episode ECE (biased upwards by the 15 queries per class of an episode); "
        "`ece_pooled` is the ECE of all queries of all episodes, with a bootstrap CI over episodes. "
        "Calibration rows: `val_temperature` (one temperature fitted on val-split episodes), "
        "`loo_temperature` (a temperature per episode from leave-one-out on its support set, K ≥ 2).",
        "",
        table,
    ]
    return experiment, "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run_id")
    parser.add_argument("--out", default="docs/results.md")
    args = parser.parse_args()
    experiment, text = section(args.run_id)
    out = Path(args.out)
    existing = (
        out.read_text()
        if out.exists()
        else "# Results\n\nGenerated by `python -m benchmarks.results_table RUN_ID`.\n\n"
    )
    pattern = re.compile(rf"^## {re.escape(experiment)}\n.*?(?=^## |\Z)", re.S | re.M)
    updated = pattern.sub(text + "\n", existing) if pattern.search(existing) else existing + text + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(updated)
    print(f"wrote section '{experiment}' to {out}")


if __name__ == "__main__":
    main()
