"""The audit's files: ``report.md``, ``report.html`` (the markdown rendered by markdown-it) and
``flagged.csv``. Every writer takes a ``redact`` function applied to the data path and to each item
name, so the same code writes the local report (names as given) and the copy logged to MLflow."""

from __future__ import annotations

import csv
import html
import io
from collections.abc import Callable
from pathlib import Path

from fewshot_med._io import write_text_atomic
from fewshot_med.audit.findings import CHECKS, SEVERITIES, AuditReport, Finding

#: Columns of ``flagged.csv``, in order.
CSV_COLUMNS = ("item", "check", "severity", "detail", "related_item")
REPORT_MD, REPORT_HTML, FLAGGED_CSV = "report.md", "report.html", "flagged.csv"
#: Rows shown per check in the report (all of them are in ``flagged.csv``).
MAX_ROWS = 20
Redact = Callable[[str], str]


def _as_given(name: str) -> str:
    return name


def _cell(text: object) -> str:
    """Text safe inside a markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _code(text: str) -> str:
    return f"`{text}`" if text else ""


def _overview(report: AuditReport, redact: Redact) -> list[str]:
    severities = report.severity_counts()
    seconds = ", ".join(f"{name} {value:.1f} s" for name, value in report.seconds.items())
    settings = ", ".join(f"{key}={value}" for key, value in report.settings.items())
    rows = [
        ("data", _code(redact(report.source))),
        (
            "images",
            f"{report.n_items} listed, {len(report.class_names)} classes ({', '.join(report.class_names)})",
        ),
        ("representation", report.features),
        ("digest", f"sha256:{report.digest}" if report.digest else "none (no readable image)"),
        ("settings", settings),
        ("time", f"{sum(report.seconds.values()):.1f} s ({seconds})"),
    ]
    lines = [f"# Data audit: {_cell(redact(report.name))}", "", "| | |", "|---|---|"]
    lines += [f"| {key} | {_cell(value)} |" for key, value in rows]
    plural = {"error": "errors", "warning": "warnings", "info": "info"}
    counts = ", ".join(f"{severities[s]} {s if severities[s] == 1 else plural[s]}" for s in SEVERITIES)
    lines += ["", f"**{counts}.** Errors must be fixed before training (`--strict` exits 1 on them)."]
    return lines


def _summary(report: AuditReport) -> list[str]:
    counts = report.counts()
    severities: dict[str, set[str]] = {}
    for finding in report.findings:
        severities.setdefault(finding.check, set()).add(finding.severity)
    lines = ["", "## Summary", "", "| check | flagged | severity | what it means |", "|---|---:|---|---|"]
    for check, spec in CHECKS.items():
        flagged = "not run" if check in report.not_run else str(counts[check])
        severity = "/".join(s for s in SEVERITIES if s in severities.get(check, ()))
        lines.append(f"| {check} | {flagged} | {severity} | {_cell(spec.explanation)} |")
    return lines


def _table(findings: list[Finding], redact: Redact) -> list[str]:
    lines = ["| item | severity | detail | related item |", "|---|---|---|---|"]
    for finding in findings[:MAX_ROWS]:
        related = redact(finding.related_item) if finding.related_item else ""
        lines.append(
            f"| {_cell(_code(redact(finding.item)))} | {finding.severity} | {_cell(finding.detail)} | "
            f"{_cell(_code(related))} |"
        )
    if len(findings) > MAX_ROWS:
        lines.append(f"| … {len(findings) - MAX_ROWS} more in `{FLAGGED_CSV}` | | | |")
    return lines


def _sections(report: AuditReport, redact: Redact) -> list[str]:
    lines: list[str] = []
    by_check: dict[str, list[Finding]] = {}
    for finding in report.findings:
        by_check.setdefault(finding.check, []).append(finding)
    section = None
    for check, spec in CHECKS.items():
        if check not in by_check:
            continue
        if spec.section != section:
            section = spec.section
            lines += ["", f"## {section}"]
        lines += [
            "",
            f"### {check} ({len(by_check[check])})",
            "",
            spec.explanation[:1].upper() + spec.explanation[1:] + ".",
            "",
        ]
        lines += _table(by_check[check], redact)
    both = {f.item for f in by_check.get("label_issue", [])} & {
        f.item for f in by_check.get("knn_disagreement", [])
    }
    if both:
        lines += ["", f"{len(both)} image(s) are suspected by both label checks; look at those first."]
    return lines


def render_markdown(report: AuditReport, redact: Redact = _as_given) -> str:
    """The report as markdown: overview, one summary row per check, then the flagged rows per check
    (at most ``MAX_ROWS`` each, ranked where the check ranks) and the notes.

    Args:
        report: the audit.
        redact: applied to the data path and every item that is a path (``report.path_items``).
    """
    redact_paths = _path_redactor(report, redact)
    lines = _overview(report, redact_paths) + _summary(report) + _sections(report, redact_paths)
    if report.notes or report.not_run:
        lines += ["", "## Notes", ""]
        lines += [f"- {_cell(note)}" for note in report.notes]
        lines += [f"- {check} not run: {_cell(reason)}" for check, reason in report.not_run.items()]
    lines += ["", "How to read this report: `docs/audit.md` of fewshot-med.", ""]
    return "\n".join(lines)


def render_html(markdown: str, title: str) -> str:
    """``markdown`` as one HTML page (markdown-it, CommonMark with tables, raw HTML disabled)."""
    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(markdown)
    style = (
        "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .5em;"
        "text-align:left;vertical-align:top}code{font-size:90%}"
    )
    return (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{style}</style></head>\n<body>\n{body}</body></html>\n"
    )


def render_csv(report: AuditReport, redact: Redact = _as_given) -> str:
    """``flagged.csv``: one row per finding, columns ``CSV_COLUMNS``."""
    redact_paths = _path_redactor(report, redact)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for finding in report.findings:
        related = redact_paths(finding.related_item) if finding.related_item else ""
        writer.writerow(
            [redact_paths(finding.item), finding.check, finding.severity, finding.detail, related]
        )
    return buffer.getvalue()


def summary_lines(report: AuditReport) -> list[str]:
    """The lines ``fewshot-med audit`` prints: what was audited, one line per check with findings (count and
    severities), and the totals."""
    severities: dict[str, list[str]] = {}
    for finding in report.findings:
        if finding.severity not in severities.setdefault(finding.check, []):
            severities[finding.check].append(finding.severity)
    lines = [f"audit of {report.source}: {report.n_items} images, {len(report.class_names)} classes"]
    lines.append(f"features: {report.features}")
    for check, count in report.counts().items():
        if count:
            lines.append(
                f"  {check:<20} {count:>6}  {'/'.join(sorted(severities[check], key=SEVERITIES.index))}"
            )
    totals = report.severity_counts()
    lines.append(
        f"{totals['error']} errors, {totals['warning']} warnings, {totals['info']} info "
        f"in {sum(report.seconds.values()):.1f} s"
    )
    return lines


def _path_redactor(report: AuditReport, redact: Redact) -> Redact:
    """``redact`` for names that are paths; class names and array rows pass as they are."""
    return lambda name: redact(name) if name in report.path_items else name


def write_report(report: AuditReport, folder: Path) -> dict[str, Path]:
    """Write ``report.md``, ``report.html`` and ``flagged.csv`` (names as given) into ``folder``.

    Returns:
        ``{file name: path}``.
    """
    markdown = render_markdown(report)
    texts = {
        REPORT_MD: markdown,
        REPORT_HTML: render_html(markdown, f"Data audit: {report.name}"),
        FLAGGED_CSV: render_csv(report),
    }
    paths = {}
    for name, text in texts.items():
        paths[name] = Path(folder) / name
        write_text_atomic(paths[name], text)
    return paths
