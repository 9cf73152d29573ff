"""One MLflow run per job, shared by every launch and every restarted worker.

The driver finds the run by the tag ``perceive_ir.run_name`` (the Ray run name) in the
experiment, or creates it; workers only receive its id and log through an ``MlflowClient``
from rank 0. Tracking URI: the configuration, else ``MLFLOW_TRACKING_URI``, else a SQLite file
(made absolute, so that workers in other folders write to the same database).
"""

from __future__ import annotations

import os
import platform as _platform
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional
from urllib.parse import urlsplit, urlunsplit

from perceive_ir.data.storage import is_secret_name, missing_store
from perceive_ir.tracking.buffer import BufferSettings, TrackingBuffer, limit_client_retries

__all__ = ["TrackingConfig", "resolve_tracking_uri", "tracking_source", "describe_store", "find_or_create_run",
           "existing_run", "RunTracker", "redact_params", "version_tags", "RUN_NAME_TAG", "safe_uri", "DEFAULT_DB",
           "when_store_answers"]

RUN_NAME_TAG = "perceive_ir.run_name"
# One default store for every job, the quickstart and perceive-registry: what one of them writes,
# the next finds, when all are launched from the same folder (the repository's root, as documented).
DEFAULT_DB = "runs/mlflow.db"


@dataclass
class TrackingConfig:
    uri: Optional[str] = None  # None: MLFLOW_TRACKING_URI, else sqlite:///<default_db>
    experiment: str = "perceive-ir"
    default_db: str = DEFAULT_DB  # relative: to the folder the job is launched from
    artifact_location: Optional[str] = None  # new experiments only; None: 'mlartifacts' beside a SQLite file
    register_as: Optional[str] = None  # register the job's products as models '<register_as>-<product>'
    # The alias every newly registered version takes: the next step of a deployment finds it by name
    # (models:/<register_as>-<product>@candidate) instead of a version number. None: no alias.
    register_alias: Optional[str] = "candidate"
    # Logging from training goes through a buffer written in the background (see tracking.buffer).
    buffer_max_metric_points: int = 100_000  # beyond it, the oldest pending points are dropped and counted
    drain_timeout_s: float = 600.0  # the end of a job waits this long for the store to take the buffer
    retry_max_interval_s: float = 10.0  # longest pause between tries while the store is away
    spool_dir: Optional[str] = None  # artifacts waiting for the store; None: <user cache>/perceive_ir/spool
    http_max_retries: int = 1  # MLflow's own HTTP retries per try (its default, 7, blocks for minutes)
    http_timeout_s: int = 15  # MLflow's HTTP timeout per request (its default: 120 s)

    def __post_init__(self) -> None:
        if self.buffer_max_metric_points < 1 or self.drain_timeout_s < 0 or self.retry_max_interval_s <= 0:
            raise ValueError("tracking: buffer_max_metric_points must be >= 1, drain_timeout_s >= 0 and "
                             "retry_max_interval_s > 0")
        if self.http_max_retries < 0 or self.http_timeout_s < 1:
            raise ValueError("tracking: http_max_retries must be >= 0 and http_timeout_s >= 1")

    def buffer_settings(self) -> BufferSettings:
        return BufferSettings(self.buffer_max_metric_points, self.drain_timeout_s, self.retry_max_interval_s,
                              self.spool_dir)


def resolve_tracking_uri(cfg: TrackingConfig) -> str:
    uri = cfg.uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{cfg.default_db}"
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):]
        if not path.startswith("/"):
            uri = f"sqlite:///{Path(path).resolve()}"
    elif "://" not in uri:  # a bare folder
        uri = str(Path(uri).resolve())
    return uri


def tracking_source(cfg: TrackingConfig) -> str:
    """Where the tracking URI of ``cfg`` comes from, for messages."""
    if cfg.uri:
        return "tracking.uri"
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return "the environment variable MLFLOW_TRACKING_URI"
    return f"the default: tracking.default_db '{cfg.default_db}' in the launch folder"


def describe_store(uri: str, source: str) -> str:
    """``<uri> (the tracking store from <source>)``, without credentials; says when its SQLite file is absent."""
    absent = "; it does not exist: nothing was ever tracked there" if missing_store(uri) else ""
    return f"{safe_uri(uri)} (the tracking store from {source}{absent})"


def safe_uri(uri: str) -> str:
    """The URI without user name or password (for params, tags and logs)."""
    parts = urlsplit(uri)
    if parts.password is None and parts.username is None:
        return uri
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


def when_store_answers(call, uri: str, wait_s: float, what: str, setting: str):
    """``call()``, retried while the tracking store at ``uri`` does not answer, for up to ``wait_s``
    (pauses from 1 s to 10 s, each one logged); then a ConnectionError that names the store and the
    ``setting`` that sets the wait. For the moments a job cannot go on without the store."""
    import logging

    log = logging.getLogger(__name__)
    deadline, pause = time.monotonic() + wait_s, 1.0
    while True:
        try:
            return call()
        except Exception as err:  # noqa: BLE001 - MLflow raises many kinds while its server is away
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            if time.monotonic() + pause > deadline:
                raise ConnectionError(f"{what}: MLflow tracking store '{safe_uri(uri)}' did not answer within "
                                      f"{setting}={wait_s:g} s: {reason}") from None
            log.warning("%s: tracking store not answering (%s); waiting for it (%.0f s left)", what, reason,
                        deadline - time.monotonic())
            time.sleep(pause)
            pause = min(2 * pause, 10.0)


def redact_params(flat: Mapping[str, Any]) -> dict[str, str]:
    """Flattened config -> MLflow params: secrets dropped, URLs without credentials, long values cut."""
    params: dict[str, str] = {}
    for key, value in flat.items():
        if is_secret_name(key):
            continue
        text = str(value)
        if re.match(r"^[a-z][a-z0-9+.-]*://", text):
            text = safe_uri(text)
        params[key] = text[:6000]
    return params


def _git_commit() -> str:
    commit = os.environ.get("PERCEIVE_IR_GIT_COMMIT")
    if commit:
        return commit
    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                              cwd=Path(__file__).resolve().parent)

    try:
        out = git("rev-parse", "HEAD")
        if out.returncode == 0:
            dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
            return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def version_tags() -> dict[str, str]:
    import importlib.metadata as md

    tags = {"git_commit": _git_commit(), "python": _platform.python_version()}
    for package in ("torch", "ray", "deepspeed", "mlflow"):
        try:
            tags[f"version.{package}"] = md.version(package)
        except md.PackageNotFoundError:
            tags[f"version.{package}"] = "absent"
    return tags


def _experiment_id(client, cfg: TrackingConfig, uri: str) -> str:
    found = client.get_experiment_by_name(cfg.experiment)
    if found is not None:
        return found.experiment_id
    location = cfg.artifact_location
    if location is None and uri.startswith("sqlite:///"):
        location = str(Path(uri[len("sqlite:///"):]).parent / "mlartifacts" / cfg.experiment)
    return client.create_experiment(cfg.experiment, artifact_location=location)


def _named_runs(client, experiment: str, run_name: str) -> list:
    quoted = run_name.replace("'", "\\'")
    return client.search_runs([experiment], filter_string=f"tags.`{RUN_NAME_TAG}` = '{quoted}'",
                              max_results=1, order_by=["attributes.start_time ASC"])


def existing_run(cfg: TrackingConfig, run_name: str) -> Optional[tuple[str, dict[str, str]]]:
    """``(run id, params)`` of the run a launch named ``run_name`` would continue, or None; creates nothing."""
    from mlflow.tracking import MlflowClient

    uri = resolve_tracking_uri(cfg)
    if missing_store(uri):  # MLflow would create an empty store to look in
        return None
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(cfg.experiment)
    runs = _named_runs(client, experiment.experiment_id, run_name) if experiment is not None else []
    return (runs[0].info.run_id, dict(runs[0].data.params)) if runs else None


def find_or_create_run(cfg: TrackingConfig, run_name: str, params: Mapping[str, Any], tags: Mapping[str, str],
                       job: str) -> tuple[str, str, bool]:
    """``(tracking URI, run id, created)``: the run tagged with ``run_name``, or a new one with the params."""
    from mlflow.tracking import MlflowClient

    uri = resolve_tracking_uri(cfg)
    client = MlflowClient(tracking_uri=uri)
    try:
        experiment = _experiment_id(client, cfg, uri)
    except Exception as err:  # noqa: BLE001 - name the store that cannot be reached
        raise ConnectionError(f"MLflow tracking store '{safe_uri(uri)}' (from 'tracking.uri' or "
                              f"MLFLOW_TRACKING_URI) cannot be used: {err}") from None
    runs = _named_runs(client, experiment, run_name)
    if runs:
        run_id = runs[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        launches = int(runs[0].data.tags.get("launches", "1")) + 1
        client.set_tag(run_id, "launches", str(launches))
        if params and not runs[0].data.params:  # created by a launch killed before it logged them
            RunTracker(uri, run_id).log_params(params)
        return uri, run_id, False
    run = client.create_run(experiment, run_name=run_name,
                            tags={RUN_NAME_TAG: run_name, "job": job, "launches": "1", **tags})
    RunTracker(uri, run.info.run_id).log_params(params)
    return uri, run.info.run_id, True


class RunTracker:
    """Logs into an existing run (rank 0 of the workers, or the driver).

    With ``background=True`` every write goes through a :class:`TrackingBuffer` (the caller never
    waits on the store); :meth:`register` and :meth:`finish` wait for it to drain first, and
    :meth:`close` ends it. Otherwise each call writes at once, so a read that follows sees it."""

    def __init__(self, uri: str, run_id: str, settings: Optional[TrackingConfig] = None,
                 background: bool = False) -> None:
        from mlflow.tracking import MlflowClient

        self.uri, self.run_id = uri, run_id
        self.settings = settings or TrackingConfig()
        self.buffer: Optional[TrackingBuffer] = None
        if background:
            limit_client_retries(self.settings.http_max_retries, self.settings.http_timeout_s)
        self.client = MlflowClient(tracking_uri=uri)
        if background:
            self.buffer = TrackingBuffer(self.client, run_id, self.settings.buffer_settings())

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in redact_params(params).items()]
        if self.buffer is not None:
            self.buffer.params(items)
            return
        for start in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[start : start + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, int(step)) for k, v in metrics.items()]
        if self.buffer is not None:
            self.buffer.metrics(items, int(step))
            return
        for start in range(0, len(items), 500):
            self.client.log_batch(self.run_id, metrics=items[start : start + 500])

    def set_tags(self, tags: Mapping[str, str]) -> None:
        if self.buffer is not None:
            self.buffer.tags(dict(tags))
            return
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, value)

    def log_file(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.buffer is not None:
            self.buffer.artifact(path, artifact_path)
            return
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_folder(self, path: str | Path, artifact_path: str) -> None:
        if self.buffer is not None:
            self.buffer.artifact(path, artifact_path)
            return
        self.client.log_artifacts(self.run_id, str(path), artifact_path)

    def log_table(self, columns: Mapping[str, list], artifact_file: str) -> None:
        """A small table (column name -> values) as a JSON artifact in the layout of MLflow's tables
        (``columns`` + ``data`` rows). A later launch of the run replaces it (``client.log_table``
        would append the rows again)."""
        names = list(columns)
        rows = [list(row) for row in zip(*(columns[n] for n in names))]
        if self.buffer is not None:
            self.buffer.dict_artifact({"columns": names, "data": rows}, artifact_file)
            return
        self.client.log_dict(self.run_id, {"columns": names, "data": rows}, artifact_file)

    def register(self, artifact: str, model_name: str) -> str:
        """A new version of registered model ``model_name`` from the run's ``artifact`` folder;
        returns its ``models:/`` URI."""
        from mlflow.exceptions import MlflowException

        self.wait_written()
        try:
            self.client.create_registered_model(model_name)
        except MlflowException:
            pass  # already registered: add a version
        version = self.client.create_model_version(model_name, source=f"runs:/{self.run_id}/{artifact}",
                                                   run_id=self.run_id)
        return f"models:/{model_name}/{version.version}"

    def wait_written(self) -> None:
        """Wait (up to ``drain_timeout_s``) until everything logged is in the store, else raise
        :class:`~perceive_ir.tracking.buffer.TrackingNotDrained`; the buffer stays open."""
        if self.buffer is not None and not self.buffer.drain():
            self.close(timeout_s=0)  # raises, naming what is missing and where it was saved

    def close(self, timeout_s: Optional[float] = None) -> None:
        """Drain and stop the background writer (nothing to do without one)."""
        buffer, self.buffer = self.buffer, None
        if buffer is not None:
            buffer.close(timeout_s)

    def finish(self, status: str = "FINISHED") -> None:
        """The run's final status, once everything logged before is written."""
        self.close()
        self.client.set_terminated(self.run_id, status=status)
