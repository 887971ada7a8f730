"""The data audit hospital users run before any training (``fewshot-med audit``): unreadable or odd files,
exact and near duplicates with the label conflicts and split or patient leaks they cause, suspected label
errors (cleanlab, deep k-NN), classes too small for K-shot episodes, and out-of-distribution images.

``audit_dataset`` returns an ``AuditReport``; ``AuditReport.errors()`` is what another command should
refuse to train on. ``write_report`` writes ``report.md``, ``report.html`` and ``flagged.csv``;
``log_audit`` logs a redacted copy to MLflow.
"""

from fewshot_med.audit.findings import CHECKS, ERROR, INFO, SEVERITIES, WARNING, AuditReport, Finding
from fewshot_med.audit.inventory import Inventory, Item, list_items
from fewshot_med.audit.record import log_audit
from fewshot_med.audit.report import (
    CSV_COLUMNS,
    render_csv,
    render_html,
    render_markdown,
    summary_lines,
    write_report,
)
from fewshot_med.audit.run import AuditSettings, audit_dataset

__all__ = [
    "CHECKS",
    "CSV_COLUMNS",
    "ERROR",
    "INFO",
    "SEVERITIES",
    "WARNING",
    "AuditReport",
    "AuditSettings",
    "Finding",
    "Inventory",
    "Item",
    "audit_dataset",
    "list_items",
    "log_audit",
    "render_csv",
    "render_html",
    "render_markdown",
    "summary_lines",
    "write_report",
]
