"""Checks of a job's inputs on the driver, before Ray starts and before any GPU is requested.

:func:`preflight` resolves the config's local paths and then checks, in order: local files
(DeepSpeed config, weight files, arch configs), the shard sources and their manifests, the
tracking store, that a relaunch under an existing run's name keeps the settings its checkpoints rest
on, the stage-1 products, and the run storage. Each failure is one line naming the
setting. Local paths are resolved against the folder the job was launched from and handed to the
workers as absolute paths; when the job runs on a remote cluster, only paths inside the uploaded
repository travel (relative to it), and any other local path is refused with the reason.
"""

from __future__ import annotations

import fnmatch
import json
import os
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Optional
from urllib.parse import urlsplit

from perceive_ir.data.storage import ENDPOINT_VARIABLE, StorageError, is_unreachable
from perceive_ir.orchestration.config import JobConfig, identity_settings, is_local_path, path_settings, set_setting
from perceive_ir.orchestration.ray_runtime import UPLOAD_EXCLUDES, submitted_job_runtime_env

__all__ = ["PreflightError", "Placement", "placement", "preflight", "resolve_paths", "describe_changes"]

_SHARED = "a storage URL: s3://bucket/prefix, or file:///path on a file system every node mounts"
_LOCAL_HOSTS = {"", "localhost", "127.0.0.1", "::1", "0.0.0.0", "auto", "local"}


class PreflightError(ValueError):
    """A job input that cannot work; ``exit_code`` 1 when a service did not answer, else 2."""

    def __init__(self, setting: str, message: str, unreachable: bool = False) -> None:
        super().__init__(f"'{setting}': {message}")
        self.setting = setting
        self.exit_code = 1 if unreachable else 2


@dataclass
class Placement:
    """Where the workers run, seen from the driver."""

    launch_dir: Path  # relative paths of the config are relative to this folder
    upload_root: Optional[Path]  # the repository copy the workers run in, when they are remote
    remote: str = ""  # why local paths of this machine do not reach the workers ("" : they do)
    in_job: bool = False  # a submitted job: this driver itself runs on the cluster


def placement(cfg: JobConfig, working_dir: Optional[Path], launch_dir: Optional[Path] = None) -> Placement:
    launch_dir = Path(launch_dir or os.getcwd()).resolve()
    job_env = submitted_job_runtime_env()
    if job_env is not None and job_env.get("working_dir"):
        return Placement(launch_dir, launch_dir, "this is a job submitted to a Ray cluster: it runs in an uploaded "
                         "copy of the repository, which holds no files of the submitting machine", in_job=True)
    address = cfg.ray.address
    if address and _host(address) not in _LOCAL_HOSTS | {socket.gethostname()}:
        root = Path(working_dir).resolve() if working_dir is not None else None
        return Placement(launch_dir, root, f"ray.address '{address}' is a remote cluster: its workers run in an "
                         "uploaded copy of the repository and cannot read this machine's files")
    return Placement(launch_dir, None)


def _host(address: str) -> str:
    netloc = urlsplit(address if "://" in address else f"//{address}").hostname
    return (netloc or address).lower()


def resolve_paths(cfg: JobConfig, where: Placement) -> None:
    """Local paths -> absolute (local Ray), or relative to the uploaded repository (remote); in place."""
    for key, value in path_settings(cfg).items():
        path = Path(value).expanduser()
        absolute = Path(os.path.normpath(path if path.is_absolute() else where.launch_dir / path))
        if not where.remote:
            set_setting(cfg, key, str(absolute))
            continue
        inside = _relative_inside(absolute, where.upload_root)
        if key == "storage.path":
            if not (where.in_job and path.is_absolute()):
                raise PreflightError(key, f"'{value}' is a local folder, but {where.remote}; checkpoints need "
                                          f"storage every node reaches: {_SHARED}")
            continue
        if inside is not None and not _excluded(inside):
            set_setting(cfg, key, inside.as_posix())  # workers start in the uploaded copy
        elif path.is_absolute() and where.in_job:
            continue  # a submitted job's driver is on the cluster: an absolute path is checked below
        else:
            reason = (f"'{inside.parts[0]}' is not uploaded with the repository" if inside is not None
                      else "it is outside the uploaded repository")
            raise PreflightError(key, f"'{value}' is a path on the submitting machine ({reason}), but "
                                      f"{where.remote}; give {_SHARED}")


def _relative_inside(path: Path, root: Optional[Path]) -> Optional[Path]:
    if root is None:
        return None
    try:
        return path.relative_to(root)
    except ValueError:
        return None


def _excluded(relative: Path) -> bool:
    return any(fnmatch.fnmatch(part, pattern) for part in relative.parts for pattern in UPLOAD_EXCLUDES)


def preflight(stage: str, cfg: JobConfig, working_dir: Optional[Path] = None,
              launch_dir: Optional[Path] = None, check_tracking: bool = True, check_relaunch: bool = True) -> JobConfig:
    """Resolve ``cfg``'s local paths (in place) and check every input of the job; raises
    :class:`PreflightError`. Call before ``ray.init``: nothing here starts Ray or touches a GPU.
    ``check_relaunch=False`` for a config that is never launched under its own name (a search's base)."""
    where = placement(cfg, working_dir, launch_dir)
    resolve_paths(cfg, where)
    if cfg.storage.path.startswith("s3://") and not cfg.storage.endpoint_url and os.environ.get(ENDPOINT_VARIABLE):
        cfg.storage.endpoint_url = os.environ[ENDPOINT_VARIABLE]  # pyarrow's S3 does not read the variable
    root = where.upload_root or where.launch_dir
    paths = path_settings(cfg)
    _check_files(cfg, paths, root, where)
    _check_sources(cfg, root)
    tracking_uri = _check_tracking(cfg) if check_tracking else None
    if tracking_uri is not None and check_relaunch:
        _check_relaunch(cfg)
    _check_products(stage, cfg, root, tracking_uri)
    _check_storage(cfg)
    return cfg


def _local(value: str, root: Path) -> Path:
    path = Path(value)
    return path if path.is_absolute() else root / path


def _hint(where: Placement) -> str:
    return f" ({where.remote})" if where.remote else ""


def _check_files(cfg: JobConfig, paths: dict[str, str], root: Path, where: Placement) -> None:
    for key, value in paths.items():
        if key in ("storage.path", "perceiver", "medium_tier") or key.startswith("data."):
            continue  # checked with their own rules below
        if not _local(value, root).exists():
            raise PreflightError(key, f"file '{value}' does not exist{_hint(where)}")
    if not is_local_path(cfg.engine.deepspeed_config):
        raise PreflightError("engine.deepspeed_config", f"'{cfg.engine.deepspeed_config}': give a local JSON file")
    try:
        json.loads(_local(cfg.engine.deepspeed_config, root).read_text())
    except ValueError as err:
        raise PreflightError("engine.deepspeed_config", f"'{cfg.engine.deepspeed_config}' is not JSON: {err}") from None


def _check_sources(cfg: JobConfig, root: Path) -> None:
    from perceive_ir.data.manifest import read_manifest
    from perceive_ir.data.storage import filesystem

    options = cfg.data.train.storage_options
    checks = [(f"data.train.sources[{i}].location", s.location) for i, s in enumerate(cfg.data.train.sources)]
    if cfg.data.validation.source:
        checks.append(("data.validation.source", cfg.data.validation.source))
    for key, location in checks:
        url = str(_local(location, root)) if "://" not in location else location
        try:
            if "{" in url or url.endswith(".tar"):  # a brace pattern of shards: its first one must exist
                import braceexpand

                first = next(iter(braceexpand.braceexpand(url)))
                fs, path = filesystem(first, options)
                if not fs.exists(path):
                    raise StorageError(f"shard '{first}' does not exist")
            else:
                read_manifest(url, options)
        except (StorageError, ValueError) as err:
            raise PreflightError(key, f"shard source '{location}': {err}", is_unreachable(err)) from None
        except Exception as err:  # noqa: BLE001 - a store that does not answer raises many kinds
            raise PreflightError(key, f"shard source '{location}': {type(err).__name__}: {err}",
                                 is_unreachable(err)) from None


def _check_tracking(cfg: JobConfig) -> str:
    """The tracking URI, after checking that its store answers (without MLflow's minutes of retries)."""
    from perceive_ir.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(cfg.tracking)
    setting = "tracking.uri" if cfg.tracking.uri else ("MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI")
                                                       else "tracking.default_db")
    scheme = urlsplit(uri).scheme
    if scheme in ("http", "https"):
        import requests

        try:
            answer = requests.get(uri.rstrip("/") + "/health", timeout=10)
        except requests.RequestException as err:
            raise PreflightError(setting, f"the tracking server {_safe(uri)} does not answer: {type(err).__name__}",
                                 unreachable=True) from None
        if answer.status_code >= 500:
            raise PreflightError(setting, f"the tracking server {_safe(uri)} answers HTTP {answer.status_code}",
                                 unreachable=True)
    elif scheme == "sqlite" or "://" not in uri:
        folder = Path(uri[len("sqlite:///"):]).parent if scheme == "sqlite" else Path(uri)
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        if not os.access(folder, os.W_OK):
            raise PreflightError(setting, f"the tracking store {uri} cannot be written (folder '{folder}')")
    return uri


def _safe(uri: str) -> str:
    from perceive_ir.tracking.mlflow_run import safe_uri

    return safe_uri(uri)


_PRODUCT_FILES = {"perceiver": ("perceiver.json",), "medium_tier": ("medium_tier.json",)}


def describe_changes(changed: list[tuple[str, str, str]], limit: int) -> str:
    """``setting 'before' -> 'now'; ...`` for the first ``limit`` changes, and how many more."""
    listed = "; ".join(f"{k} {old!r} -> {new!r}" for k, old, new in changed[:limit])
    return listed + (f" and {len(changed) - limit} more" if len(changed) > limit else "")


def _check_relaunch(cfg: JobConfig) -> None:
    from perceive_ir.config import flatten
    from perceive_ir.tracking.mlflow_run import existing_run, redact_params

    found = existing_run(cfg.tracking, cfg.name)
    if found is None:
        return
    run_id, before = found
    now = identity_settings(redact_params(flatten(cfg)))
    # Settings a run logged no value for are newer than it: nothing to compare.
    changed = sorted((k, before[k], v) for k, v in now.items() if k in before and before[k] != v)
    if not changed:
        return
    raise PreflightError("name", f"a run named '{cfg.name}' (MLflow run {run_id}) was started with other settings "
                         f"({describe_changes(changed, 6)}), and a relaunch under its name resumes its checkpoints: give this job "
                         f"another name to start a new run, or keep those settings to continue that one")


def _check_products(stage: str, cfg: JobConfig, root: Path, tracking_uri: Optional[str]) -> None:
    for key in ("perceiver", "medium_tier"):
        location = getattr(cfg, key, None)
        if not isinstance(location, str) or not location:
            continue
        if location.startswith(("runs:/", "models:/", "mlflow-artifacts:/")):
            if tracking_uri is not None:
                _check_mlflow_product(key, location, cfg, tracking_uri)
            continue
        folder = _local(location, root)
        missing = [name for name in _PRODUCT_FILES[key] if not (folder / name).is_file()]
        if not folder.is_dir():
            raise PreflightError(key, f"folder '{location}' does not exist")
        if missing:
            raise PreflightError(key, f"'{location}' is not a {key.replace('_', ' ')} folder (no {', '.join(missing)})")
        if key == "medium_tier":
            k = json.loads((folder / "medium_tier.json").read_text()).get("k", 0)
            absent = [f"fold_{j}.safetensors" for j in range(int(k)) if not (folder / f"fold_{j}.safetensors").is_file()]
            if absent:
                raise PreflightError(key, f"'{location}' lacks {', '.join(absent)}")


def _check_mlflow_product(key: str, location: str, cfg: JobConfig, tracking_uri: str) -> None:
    """The URI names artifacts that exist (listed, not downloaded); the message names the store asked."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from perceive_ir.data.storage import missing_store
    from perceive_ir.products.locations import registered_version
    from perceive_ir.tracking.mlflow_run import describe_store, tracking_source

    store = describe_store(tracking_uri, tracking_source(cfg.tracking))
    if missing_store(tracking_uri):
        raise PreflightError(key, f"'{location}' cannot be resolved in {store}; give the store that holds it "
                                  "(tracking.uri or MLFLOW_TRACKING_URI)")
    try:
        uri = registered_version(location, tracking_uri).source if location.startswith("models:/") else location
        if uri.startswith("runs:/"):
            run_id, _, path = uri[len("runs:/"):].partition("/")
            found = MlflowClient(tracking_uri=tracking_uri).list_artifacts(run_id, path)
        else:
            found = mlflow.artifacts.list_artifacts(artifact_uri=uri, tracking_uri=tracking_uri)
    except Exception as err:  # noqa: BLE001 - MLflow raises several types; one line naming the URI
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise PreflightError(key, f"'{location}' cannot be resolved in {store}: {message}",
                             is_unreachable(err)) from None
    if not found:
        raise PreflightError(key, f"'{location}' names no artifacts in {store}")


def _check_storage(cfg: JobConfig) -> None:
    """The run storage exists (or can be made) and takes a write."""
    from perceive_ir.orchestration.storage import run_storage

    try:
        path, filesystem = run_storage(cfg.storage)
        probe = f"{path}/.preflight-{uuid.uuid4().hex}"
        if filesystem is None:
            Path(probe).write_bytes(b"")
            Path(probe).unlink()
        else:
            with filesystem.open_output_stream(probe) as f:
                f.write(b"")
            filesystem.delete_file(probe)
    except Exception as err:  # noqa: BLE001 - local, pyarrow and S3 errors alike: one line
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise PreflightError("storage.path", f"'{cfg.storage.path}' cannot be written: {message}",
                             is_unreachable(err) or "cannot be reached" in message) from None
