"""The audit's copy in MLflow: an ``audit`` run in the experiment ``audit`` holding the counts as metrics, the
settings as params, the data digest as a tag, and the report and flagged rows as artifacts, every data path
(the source, item names) replaced by its salted token (``fewshot_med.privacy.redact_path``) unless
``log_paths``. Details never hold paths or patient ids (``Finding``), so nothing else needs redacting."""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

from fewshot_med import tracking
from fewshot_med.audit.findings import AuditReport
from fewshot_med.audit.report import render_csv, render_html, render_markdown
from fewshot_med.privacy import redact_path
from fewshot_med.tracking import names

if TYPE_CHECKING:
    from fewshot_med.config import TrackingConfig


def log_audit(
    report: AuditReport,
    log_paths: bool = False,
    settings: TrackingConfig | None = None,
    from_run: str | None = None,
) -> str | None:
    """Log the audit as a top-level ``audit`` run.

    Args:
        report: the audit.
        log_paths: keep paths and file names as they are (otherwise salted tokens).
        settings: which store (``tracking_uri``; default ``$MLFLOW_TRACKING_URI``, else ``./mlruns``).
        from_run: the run whose backbone gave the features, tagged ``from_run``.

    Returns:
        The run id.
    """
    redact = partial(redact_path, log_paths=log_paths)
    is_path = report.source in report.path_items
    tags = {
        names.STAGE_TAG: names.AUDIT,
        names.DATA_NAME_TAG: redact(report.source) if is_path else report.name,
        names.DATA_SOURCE_TAG: redact(report.source) if is_path else report.source,
        names.AUDIT_FEATURES_TAG: report.features,
    }
    if report.digest:
        tags[names.DATA_DIGEST_TAG] = report.digest
    if from_run:
        tags[names.FROM_RUN_TAG] = from_run
    counts = {**report.counts(), **report.severity_counts()}
    metrics = {names.audit_metric(key): value for key, value in counts.items()}
    metrics[names.audit_metric("items")] = report.n_items
    metrics[names.audit_metric("seconds")] = sum(report.seconds.values())
    markdown = render_markdown(report, redact)
    with tracking.benchmark_run(names.AUDIT, experiment=names.AUDIT, tags=tags, settings=settings) as handle:
        tracking.log_params(report.settings)
        tracking.log_metrics(metrics)
        tracking.log_text_artifact(markdown, names.AUDIT_REPORT_MD)
        tracking.log_text_artifact(
            render_html(markdown, f"Data audit: {tags[names.DATA_NAME_TAG]}"), names.AUDIT_REPORT_HTML
        )
        tracking.log_text_artifact(render_csv(report, redact), names.AUDIT_FLAGGED_CSV)
    return handle.run_id
