"""MLflow tracking: one run per job (found again by its Ray run name), params, metrics, artifacts."""

from perceive_ir.tracking.mlflow_run import (
    RUN_NAME_TAG,
    RunTracker,
    TrackingConfig,
    find_or_create_run,
    redact_params,
    resolve_tracking_uri,
    version_tags,
)

__all__ = [
    "RUN_NAME_TAG",
    "RunTracker",
    "TrackingConfig",
    "find_or_create_run",
    "redact_params",
    "resolve_tracking_uri",
    "version_tags",
]
