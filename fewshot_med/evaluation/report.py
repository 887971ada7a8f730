"""Results tables: method x K with mean ± 95% CI, as markdown and as rows for CSV."""

from __future__ import annotations

from collections.abc import Sequence

from fewshot_med.evaluation.runner import EpisodeResults

TABLE_METRICS: tuple[str, ...] = ("accuracy", "balanced_accuracy", "macro_auroc", "ece", "brier", "nll")


def summary_rows(results: Sequence[EpisodeResults]) -> list[dict[str, object]]:
    """One row per (method, K): ``method, k_shot, episodes, <metric>, <metric>_ci95 …``."""
    rows = []
    for result in results:
        row: dict[str, object] = {"method": result.method, "k_shot": result.k_shot, "episodes": len(result)}
        for metric, (mean, ci95) in result.summary().items():
            row[metric], row[f"{metric}_ci95"] = mean, ci95
        rows.append(row)
    return rows


def markdown_table(results: Sequence[EpisodeResults], metrics: Sequence[str] = TABLE_METRICS) -> str:
    """A markdown table, one row per (method, K), cells ``mean ± ci95`` (percent for accuracies)."""
    header = ["method", "K", "episodes", *metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in summary_rows(results):
        cells = [str(row["method"]), str(row["k_shot"]), str(row["episodes"])]
        for metric in metrics:
            if metric not in row:
                cells.append("")
                continue
            scale, digits = (100, 1) if metric in ("accuracy", "balanced_accuracy", "macro_auroc") else (1, 3)
            cells.append(f"{row[metric] * scale:.{digits}f} ± {row[f'{metric}_ci95'] * scale:.{digits}f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
