"""A RayJob submitted as KubeRay's submitter Job does it (K8sJobMode): one bash line that submits the
entrypoint with ``ray job submit --no-wait`` (unless the submission id exists) and follows its logs."""

from __future__ import annotations

import json
import secrets
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import yaml

from rehearsal.manifests import ServiceMap
from rehearsal.pods import Pod, PodSet

__all__ = ["submit_command", "RayJobRun", "run_rayjob"]


def submit_command(rayjob: dict, address: str, job_id: str) -> str:
    """The submitter's shell line for ``rayjob``, built as KubeRay's ``GetK8sJobCommand`` builds it."""
    spec = rayjob["spec"]
    submit = ["ray", "job", "submit", "--address", address, "--no-wait"]
    if spec.get("runtimeEnvYAML"):
        submit += ["--runtime-env-json", shlex.quote(json.dumps(yaml.safe_load(spec["runtimeEnvYAML"])))]
    if spec.get("metadata"):
        submit += ["--metadata-json", shlex.quote(json.dumps(spec["metadata"]))]
    submit += ["--submission-id", job_id]
    if spec.get("entrypointNumCpus"):
        submit += ["--entrypoint-num-cpus", f"{float(spec['entrypointNumCpus']):f}"]
    if spec.get("entrypointNumGpus"):
        submit += ["--entrypoint-num-gpus", f"{float(spec['entrypointNumGpus']):f}"]
    if spec.get("entrypointResources"):
        submit += ["--entrypoint-resources", shlex.quote(spec["entrypointResources"])]
    status = ["ray", "job", "status", "--address", address, job_id, ">/dev/null", "2>&1"]
    follow = ["ray", "job", "logs", "--address", address, "--follow", job_id]
    words = ["if", "!", *status, ";", "then", *submit, "--", spec["entrypoint"].strip(), ";", "fi", ";", *follow]
    return " ".join(words)


@dataclass
class RayJobRun:
    name: str
    job_id: str
    status: str
    seconds: float
    log: Path


def run_rayjob(pods: PodSet, services: ServiceMap, rayjob: dict, cluster_name: str, image: Path,
               submitter_env: dict[str, str], timeout_s: float,
               while_running: Optional[Callable[[Pod, str], None]] = None) -> RayJobRun:
    """Submit ``rayjob`` to the running cluster and wait for its end; ``while_running(submitter, job_id)``
    is called once while the job runs (the rehearsal's faults go there)."""
    from ray.job_submission import JobSubmissionClient

    name = rayjob["metadata"]["name"]
    job_id = f"{name}-{secrets.token_hex(3)}"  # KubeRay: the RayJob's name and a random suffix
    namespace = rayjob["metadata"].get("namespace", "default")
    address = services.translate(f"http://{cluster_name}-head-svc.{namespace}.svc.cluster.local:8265")
    start = time.perf_counter()
    submitter = pods.start(f"{name}-submitter", ["bash", "-ce", submit_command(rayjob, address, job_id)],
                           {**submitter_env, "RAY_DASHBOARD_ADDRESS": address, "RAY_JOB_SUBMISSION_ID": job_id},
                           image, group=f"Job/{name}")
    if while_running is not None:
        while_running(submitter, job_id)
    try:
        submitter.process.wait(timeout=max(1.0, timeout_s - (time.perf_counter() - start)))
    except Exception:  # noqa: BLE001 - a timeout: stop the job, report it
        JobSubmissionClient(address).stop_job(job_id)
        submitter.stop()
        raise TimeoutError(f"RayJob {name} did not finish within {timeout_s:.0f} s; log {submitter.log}") from None
    status = str(JobSubmissionClient(address).get_job_status(job_id))
    return RayJobRun(name, job_id, status.rsplit(".", 1)[-1], time.perf_counter() - start, submitter.log)
