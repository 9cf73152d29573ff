"""The Ray runtime of a job: joining or starting Ray, the workers' runtime environment, what is
uploaded with the repository, and the temporary folder of a local Ray's processes."""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

from perceive_ir.data.node_cache import node_cache
from perceive_ir.orchestration.config import RaySettings

__all__ = ["UPLOAD_EXCLUDES", "connect", "runtime_env", "submitted_job_runtime_env", "local_ray_temporary_folder",
           "pin_autoscaling_coordinator_here"]

# Environment a worker needs from the launching shell when it is set there (never credentials).
_PASSED_ENV = ("HF_HUB_OFFLINE", "TORCH_EXTENSIONS_DIR", "DS_ACCELERATOR", "OMP_NUM_THREADS", "AWS_ENDPOINT_URL",
               "PERCEIVE_IR_CACHE")
UPLOAD_EXCLUDES = [".git", ".venv", "runs", "mlruns", "mlartifacts", "*.db", "__pycache__", "*.egg-info"]


def runtime_env(settings: RaySettings, working_dir: Optional[Path], in_job: bool) -> dict[str, Any]:
    """Workers run in the repository's folder (relative config paths hold) with ``platform/`` importable.
    Inside a submitted job the working folder is already the job's: only environment variables are added."""
    env_vars = {name: os.environ[name] for name in _PASSED_ENV if name in os.environ}
    env_vars["PYTHONPATH"] = os.pathsep.join(["platform", "."])  # relative to the worker's working folder
    if settings.health_check_interval_s is not None:
        env_vars["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = str(settings.health_check_interval_s)
    if settings.worker_start_timeout_s is not None:
        env_vars["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(settings.worker_start_timeout_s)
    env: dict[str, Any] = {"env_vars": env_vars}
    if not in_job and working_dir is not None:
        env.update(working_dir=str(working_dir), excludes=UPLOAD_EXCLUDES)
    return env


def submitted_job_runtime_env() -> Optional[dict]:
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return None
    try:
        return json.loads(raw).get("runtime_env") or {}
    except json.JSONDecodeError:
        return {}


def connect(settings: RaySettings, working_dir: Optional[Path]) -> None:
    """Join the cluster of a submitted job, a given address, or start a local Ray."""
    import ray

    if settings.health_check_interval_s is not None:
        os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = str(settings.health_check_interval_s)
    if settings.worker_start_timeout_s is not None:
        os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(settings.worker_start_timeout_s)
    if ray.is_initialized():
        return
    job_env = submitted_job_runtime_env()
    in_job = job_env is not None and bool(job_env.get("working_dir"))
    env = runtime_env(settings, working_dir, in_job)
    if in_job and "PYTHONPATH" in job_env.get("env_vars", {}):
        env["env_vars"].pop("PYTHONPATH")  # the job's own setting wins; merging would conflict
    kwargs: dict[str, Any] = {"runtime_env": env, "log_to_driver": True}
    # RAY_ADDRESS in the shell names a cluster as the setting does (Ray's own convention)
    address = settings.address or os.environ.get("RAY_ADDRESS") or None
    if address:
        kwargs["address"] = address
    elif not in_job and settings.local_cpus:
        kwargs["num_cpus"] = settings.local_cpus
    if not address and job_env is None:
        # A new local Ray, never the cluster that some `ray start` on this machine left its address for
        # (which ray.init without an address joins, dead or alive).
        kwargs["address"] = "local"
        # Read by a raylet this process starts; ignored when ray.init joins a running cluster.
        os.environ.setdefault("RAY_worker_niceness", str(settings.local_worker_niceness))
        with local_ray_temporary_folder() as scratch:  # what its processes leave goes with this driver
            env["env_vars"]["TMPDIR"] = scratch
            env["env_vars"]["PERCEIVE_IR_CACHE"] = os.environ["PERCEIVE_IR_CACHE"]  # outlives the scratch
            ray.init(**kwargs)
        return
    ray.init(**kwargs)


@contextlib.contextmanager
def local_ray_temporary_folder():
    """Around the ``ray.init`` that starts a local Ray: its processes (workers, agents) get a
    temporary folder of this driver's own, removed when the driver exits. Processes killed hard
    (with a killed driver, or at Ray's shutdown) cannot remove what they left there; the folders
    of drivers no longer alive are removed here, at the next launch. Ray's session folder stays
    where it would have been, and so does the product cache (``PERCEIVE_IR_CACHE``)."""
    root = Path(tempfile.gettempdir()) / "perceive_ir_jobs" / str(os.getuid())
    for stale in root.glob("*"):
        if stale.name.isdigit() and not _alive(int(stale.name)):
            shutil.rmtree(stale, ignore_errors=True)
    scratch = root / str(os.getpid())
    scratch.mkdir(parents=True, exist_ok=True)
    atexit.register(shutil.rmtree, scratch, True)  # registered before ray.init: runs after Ray's shutdown
    os.environ.setdefault("RAY_TMPDIR", tempfile.gettempdir())
    # caches outlive the job: the node's, as a process outside this folder finds it
    os.environ.setdefault("PERCEIVE_IR_CACHE", str(node_cache()))
    previous = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(scratch)  # inherited by the processes that ray.init starts
    try:
        yield str(scratch)
    finally:
        if previous is None:
            os.environ.pop("TMPDIR")
        else:
            os.environ["TMPDIR"] = previous


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def pin_autoscaling_coordinator_here() -> None:
    """Create Ray's cluster-wide autoscaling coordinator (a detached actor, bound for good to the node
    that first asks for it) on this process's node, before any Train controller does. A search's Train
    controllers run on the nodes of their trial functions; were the first of them to create it on a node
    that is later lost, every later resource request of the cluster's Train runs would fail. Called by
    drivers, which run on the head."""
    import logging

    try:
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            get_or_create_autoscaling_coordinator,
        )
    except ImportError:  # another Ray version: nothing to pin
        logging.getLogger(__name__).info("Ray has no autoscaling coordinator to place")
        return
    get_or_create_autoscaling_coordinator()
