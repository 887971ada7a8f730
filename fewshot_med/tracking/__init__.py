"""MLflow tracking: the only package that imports mlflow (lazily, so importing this one is cheap).

One parent run per pipeline invocation (``pipeline_run``) with a nested run per stage and method
(``stage_run``); the logging functions write to the current run and do nothing outside a tracked one.
The default store is ``./mlruns`` (SQLite database and artifacts); see ``tracking_uri``. Every metric
key, tag, param and artifact path written is named in ``fewshot_med.tracking.names``.
"""

import os

# Hospital networks are often closed: no usage telemetry unless the user turns it on.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# A tracking server that stops answering fails a command in about half a minute, not MLflow's default
# of minutes (7 retries, doubling from 2 s, 120 s per request); the user's own settings win.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")

from fewshot_med.tracking import names
from fewshot_med.tracking._store import (
    StoreError,
    check_port,
    experiment_pages,
    initialise_store,
    serve,
    tracking_uri,
    ui_command,
)
from fewshot_med.tracking.models import (
    load_backbone,
    load_run_backbone,
    load_swag,
    log_backbone,
    log_classifier,
    log_swag,
)
from fewshot_med.tracking.names import metric_key
from fewshot_med.tracking.registry import Registration, register_model
from fewshot_med.tracking.review import CalibratorFit, ReportPlot, RunReview, collect_run
from fewshot_med.tracking.runs import (
    RunHandle,
    benchmark_run,
    continue_interrupted_run,
    download_stage_artifact,
    find_stage_run,
    flatten_params,
    log_dataset_input,
    log_dict_artifact,
    log_figure,
    log_metrics,
    log_params,
    log_text_artifact,
    logged_dataset_name,
    model_tags,
    pipeline_run,
    pipeline_run_id,
    redact_text,
    set_tags,
    stage_metrics_logger,
    stage_run,
    store_uri,
    summary_metrics,
    version_tags,
)

__all__ = [
    "CalibratorFit",
    "Registration",
    "ReportPlot",
    "RunHandle",
    "RunReview",
    "StoreError",
    "benchmark_run",
    "check_port",
    "collect_run",
    "continue_interrupted_run",
    "download_stage_artifact",
    "experiment_pages",
    "find_stage_run",
    "flatten_params",
    "initialise_store",
    "load_backbone",
    "load_run_backbone",
    "load_swag",
    "log_backbone",
    "log_classifier",
    "log_dataset_input",
    "log_dict_artifact",
    "log_figure",
    "log_metrics",
    "log_params",
    "log_swag",
    "log_text_artifact",
    "logged_dataset_name",
    "metric_key",
    "model_tags",
    "names",
    "pipeline_run",
    "pipeline_run_id",
    "redact_text",
    "register_model",
    "serve",
    "set_tags",
    "stage_metrics_logger",
    "stage_run",
    "store_uri",
    "summary_metrics",
    "tracking_uri",
    "ui_command",
    "version_tags",
]
