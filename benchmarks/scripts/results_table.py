"""Write a pipeline run's results table into the docs, with the lineage needed to rerun it.

Run: ``python -m benchmarks.scripts.results_table RUN_ID [--out docs/results.md]`` after
``fewshot-med run configs/<dataset>.yaml``, or with ``--config configs/<name>.yaml`` after
``fewshot-med evaluate configs/<name>.yaml --from RUN``. The section named after the config (by
default the run's experiment) is replaced (or added); other sections stay. The run is read through
``fewshot_med.tracking.collect_run``.
"""

from __future__ import annotations

import argparse
import re
import tempfile
from pathlib import Path

from fewshot_med.errors import FewshotMedError
from fewshot_med.tracking import RunReview, collect_run, names

_ECE = "ece_pooled"


def _lowest_pooled_ece(review: RunReview) -> str:
    """Per (method, K) on the pipeline run: the calibration with the lowest pooled test ECE."""
    lines = [
        "| method | K | lowest ece_pooled | ece_pooled | uncalibrated ece_pooled |",
        "|---|---|---|---|---|",
    ]
    missing = (float("nan"), float("nan"))
    for method in review.methods:
        for k_shot in review.shots:
            values = {
                calibration: (review.metrics[key], review.metrics.get(names.ci95(key), float("nan")))
                for calibration in (names.UNCALIBRATED, *review.calibrations)
                if (key := names.test_metric(k_shot, method, calibration, _ECE)) in review.metrics
            }
            if not values:
                continue
            best = min(values, key=lambda name: values[name][0])
            raw = values.get(names.UNCALIBRATED, missing)
            lines.append(
                f"| {method} | {k_shot} | {best} | {values[best][0]:.3f} ± {values[best][1]:.3f} "
                f"| {raw[0]:.3f} ± {raw[1]:.3f} |"
            )
    return "\n".join(lines)


def section(run_id: str, config: Path | None = None) -> tuple[str, str]:
    """``(section name, markdown section)`` for a finished pipeline run started from ``config``
    (default ``configs/<experiment>.yaml``)."""
    with tempfile.TemporaryDirectory(prefix="fewshot-med-results-") as folder:
        try:
            review = collect_run(run_id, Path(folder), with_plots=False)
        except FewshotMedError as error:
            raise SystemExit(str(error)) from None
    config = config or Path("configs") / f"{review.experiment_name}.yaml"
    table = re.sub(
        r"Lowest (pooled )?test ECE per method and K:\n\n.*?\n\n",
        lambda _: "Lowest pooled test ECE per method and K:\n\n" + _lowest_pooled_ece(review) + "\n\n",
        review.results_markdown.strip(),
        flags=re.S,
    )
    times = ", ".join(
        f"{stage} {review.metrics[names.time_metric(stage)] / 60:.1f} min"
        for stage in names.STAGES
        if names.time_metric(stage) in review.metrics
    )
    training = review.training
    pretrain = training.get(names.stage_metric(names.PRETRAIN, "best_val_balanced_accuracy"), float("nan"))
    meta_accuracy = names.stage_metric(names.META_TRAIN, "best_val_accuracy")
    meta_line = (
        f"; after meta-training, 5-shot accuracy on novel val episodes "
        f"{100 * training[meta_accuracy]:.1f}% "
        f"(episode {training[names.stage_metric(names.META_TRAIN, 'best_episode')]:.0f})"
        if meta_accuracy in training
        else ""
    )
    if review.from_run:
        command = f"`fewshot-med evaluate {config} --from {review.from_run}`"
        backbone = f"- backbone `{review.backbone}` of MLflow run `{review.from_run}`"
    else:
        command = (
            f"`fewshot-med run {config}` (or `python -m benchmarks.scripts.pipeline_wall {config}`, the "
            "same run plus peak memory)"
        )
        backbone = (
            f"- backbone `{review.backbone}`; base-class val balanced accuracy after pretraining "
            f"{100 * pretrain:.1f}%{meta_line}"
        )
    lines = [
        f"## {config.stem}",
        "",
        f"- command: {command}; config logged as `{names.CONFIG}`",
        f"- MLflow run `{review.run_id}`; git commit `{review.git_commit or 'unknown'}`"
        f"{' (uncommitted changes)' if review.git_dirty == 'true' else ''}; seed {review.seed}",
        f"- data `{review.data_source}`, content digest sha256 `{review.data_digest}`",
        backbone,
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
    return config.stem, "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run_id")
    parser.add_argument("--out", default="docs/results.md")
    parser.add_argument("--config", type=Path, help="the config the run was started with")
    args = parser.parse_args()
    experiment, text = section(args.run_id, args.config)
    out = Path(args.out)
    existing = (
        out.read_text()
        if out.exists()
        else "# Results\n\nGenerated by `python -m benchmarks.scripts.results_table RUN_ID`.\n\n"
    )
    pattern = re.compile(rf"^## {re.escape(experiment)}\n.*?(?=^## |\Z)", re.S | re.M)
    updated = pattern.sub(text + "\n", existing) if pattern.search(existing) else existing + text + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(updated)
    print(f"wrote section '{experiment}' to {out}")


if __name__ == "__main__":
    main()
