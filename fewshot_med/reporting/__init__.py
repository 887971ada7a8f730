"""Reports for readers without MLflow, rendered from what ``fewshot_med.tracking.collect_run`` gathered
(the reporting floor sits above tracking)."""
