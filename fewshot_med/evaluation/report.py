"""Results tables: method x K (x calibration) with mean ± 95% CI, as markdown, CSV and rows."""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence

from fewshot_med.evaluation.intervals import paired_difference_ci95
from fewshot_med.evaluation.runner import EpisodeResults

TABLE_METRICS: tuple[str, ...] = (
    "accuracy",
    "balanced_accuracy",
    "macro_auroc",
    "ece",
    "ece_pooled",
    "adaptive_ece",
    "brier",
    "nll",
    "aurc",
    "accuracy_at_coverage",
)
#: shown in percent; the other metrics with three decimals
PERCENT_METRICS = ("accuracy", "balanced_accuracy", "macro_auroc", "accuracy_at_coverage")


def summary_rows(results: Sequence[EpisodeResults]) -> list[dict[str, object]]:
    """One row per result: ``method, k_shot, calibration, episodes, <metric>, <metric>_ci95 …``."""
    rows = []
    for result in results:
        row: dict[str, object] = {
            "method": result.method,
            "k_shot": result.k_shot,
            "calibration": result.calibration,
            "episodes": len(result),
        }
        for metric, (mean, ci95) in result.summary().items():
            row[metric], row[f"{metric}_ci95"] = mean, ci95
        rows.append(row)
    return rows


def summary_csv(results: Sequence[EpisodeResults]) -> str:
    """``summary_rows`` as CSV text (the union of all columns; blank where a row lacks one)."""
    rows = summary_rows(results)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _cell(row: dict[str, object], metric: str) -> str:
    if metric not in row:
        return ""
    scale, digits = (100, 1) if metric in PERCENT_METRICS else (1, 3)
    return f"{row[metric] * scale:.{digits}f} ± {row[f'{metric}_ci95'] * scale:.{digits}f}"


def markdown_table(results: Sequence[EpisodeResults], metrics: Sequence[str] = TABLE_METRICS) -> str:
    """A markdown table, one row per (method, K, calibration), cells ``mean ± ci95`` (percent for
    accuracies and AUROC); the calibration column appears when some result is calibrated."""
    calibrated = any(result.calibration != "none" for result in results)
    header = ["method", "K", *(["calibration"] if calibrated else []), "episodes", *metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in summary_rows(results):
        cells = [str(row["method"]), str(row["k_shot"])]
        cells += [str(row["calibration"])] if calibrated else []
        cells += [str(row["episodes"]), *(_cell(row, metric) for metric in metrics)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def best_calibration_table(results: Sequence[EpisodeResults], metric: str = "ece_pooled") -> str:
    """Per (method, K): the calibration with the lowest test ``metric`` (by default the pooled ECE,
    which per-episode sampling noise does not inflate), and that value next to the uncalibrated one
    (a description of the test results, not a selection rule)."""
    lines = [
        f"| method | K | lowest {metric} | {metric} | uncalibrated {metric} |",
        "|---|---|---|---|---|",
    ]
    groups: dict[tuple[str, int], list[EpisodeResults]] = {}
    for result in results:
        groups.setdefault((result.method, result.k_shot), []).append(result)
    for (method, k_shot), group in groups.items():
        means = {result.calibration: result.summary()[metric] for result in group}
        best = min(means, key=lambda name: means[name][0])
        raw = means.get("none", (float("nan"), float("nan")))
        best_cell = f"{means[best][0]:.3f} ± {means[best][1]:.3f}"
        lines.append(f"| {method} | {k_shot} | {best} | {best_cell} | {raw[0]:.3f} ± {raw[1]:.3f} |")
    return "\n".join(lines)


def paired_difference_table(
    results: Sequence[EpisodeResults], metrics: Sequence[str] = ("accuracy", "ece")
) -> str:
    """Per K: every method minus the first one listed, paired on the same episodes (the common
    prefix when a method ran fewer), as ``mean ± 95% CI`` of the per-episode differences.

    Only uncalibrated results are compared (temperature scaling leaves accuracy unchanged).
    """
    raw = [result for result in results if result.calibration == "none"]
    header = ["method", "K", "vs", "episodes", *(f"Δ {metric}" for metric in metrics)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for k_shot in sorted({result.k_shot for result in raw}):
        at_k = [result for result in raw if result.k_shot == k_shot]
        reference = at_k[0]
        for result in at_k[1:]:
            n = min(len(result), len(reference))
            cells = [result.method, str(k_shot), reference.method, str(n)]
            for metric in metrics:
                mean, half_width = paired_difference_ci95(
                    result.values(metric)[:n], reference.values(metric)[:n]
                )
                scale, digits = (100, 1) if metric in PERCENT_METRICS else (1, 3)
                cells.append(f"{mean * scale:+.{digits}f} ± {half_width * scale:.{digits}f}")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def failed_methods_table(failed: Mapping[str, str]) -> str:
    """Markdown: each method whose evaluation raised (label -> one-line reason), so a results table
    that lacks it says why."""
    lines = ["| method | reason |", "|---|---|"]
    lines += [f"| {method} | {reason.replace('|', '/')} |" for method, reason in failed.items()]
    return "\n".join(lines)
