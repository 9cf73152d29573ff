"""The KubeRay controller's own validation (v1.4 and later), beyond the CRD schema, as data.

Each rule names the function of ``ray-operator/controllers/ray/utils/validation.go`` it ports, the kinds it
applies to, a check that returns the controller's complaint (or None), and a way to plant a violation in a
valid manifest, so that the test can show the check catches it. Only the rules that can apply to this
project's specs are ported (no RayService, no GCS fault tolerance, no network policy or TLS options); a
feature gate is taken as off, the controller's default.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Optional

import yaml

MAX_RAYCLUSTER_NAME = 53  # MaxRayClusterNameLength
MAX_RAYJOB_NAME = MAX_RAYCLUSTER_NAME - 6  # MaxRayJobNameLength
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
CLUSTER_SELECTOR_KEY = "ray.io/cluster"
AUTOSCALER_V2_ENV = "RAY_enable_autoscaler_v2"
RESOURCE_PARAMS = ("num-cpus", "num-gpus", "memory", "resources")


@dataclass(frozen=True)
class Rule:
    name: str  # what the controller checks, after the Go function that checks it
    kinds: tuple[str, ...]
    check: Callable[[dict], Optional[str]]
    plant: Callable[[dict], None]  # makes a valid manifest of one of ``kinds`` break the rule


def cluster_specs(doc: dict) -> list[dict]:
    """The RayCluster specs inside a manifest: a RayCluster's own, a RayJob's ``rayClusterSpec``."""
    if doc["kind"] == "RayCluster":
        return [doc["spec"]]
    spec = doc["spec"].get("rayClusterSpec")
    return [spec] if spec else []


def _first_spec(doc: dict) -> dict:
    (spec,) = cluster_specs(doc)
    return spec


def _groups(spec: dict) -> list[tuple[str, dict]]:
    return [("Head", spec["headGroupSpec"])] + [(g.get("groupName", "?"), g) for g in spec.get("workerGroupSpecs", [])]


def _containers(group: dict) -> list[dict]:
    return ((group.get("template") or {}).get("spec") or {}).get("containers") or []


def _autoscaling(spec: dict) -> bool:
    return bool(spec.get("enableInTreeAutoscaling"))


def _autoscaler_v2(spec: dict) -> bool:
    if (spec.get("autoscalerOptions") or {}).get("version") == "v2":
        return True
    head = _containers(spec["headGroupSpec"])
    env = {e["name"]: e.get("value") for e in (head[0].get("env") or [])} if head else {}
    return env.get(AUTOSCALER_V2_ENV) in ("1", "true")


def _each_spec(check: Callable[[dict], Optional[str]]) -> Callable[[dict], Optional[str]]:
    def over_specs(doc: dict) -> Optional[str]:
        return next((found for spec in cluster_specs(doc) if (found := check(spec))), None)

    return over_specs


# --- RayCluster specs (ValidateRayClusterSpec), also inside a RayJob ------------------------------------------

def _containers_present(spec: dict) -> Optional[str]:
    for name, group in _groups(spec):
        if not _containers(group):
            return f"{'headGroupSpec' if name == 'Head' else 'workerGroupSpec'} should have at least one container"
    return None


def _replica_bounds(spec: dict) -> Optional[str]:
    for group in spec.get("workerGroupSpecs", []):
        low, high, name = group.get("minReplicas"), group.get("maxReplicas"), group.get("groupName")
        if not _autoscaling(spec) and (low is None or high is None):
            return f"worker group {name} must set both minReplicas and maxReplicas when autoscaling is disabled"
        if low is not None and low < 0 or high is not None and high < 0:
            return f"worker group {name} has negative minReplicas or maxReplicas"
        if low is not None and high is not None and low > high:
            return f"worker group {name} has minReplicas {low} greater than maxReplicas {high}"
    return None


def _group_resources(spec: dict) -> Optional[str]:
    for name, group in _groups(spec):
        params = group.get("rayStartParams") or {}
        if any(params.get(k) for k in RESOURCE_PARAMS) and group.get("resources"):
            return (f"resource fields should not be set in both rayStartParams and Resources for {name} group; "
                    "please use only one")
    return None


def _group_labels(spec: dict) -> Optional[str]:
    for name, group in _groups(spec):
        if "labels" in (group.get("rayStartParams") or {}):
            return f"rayStartParams['labels'] is not supported for {name} group; please use the top-level Labels field"
    return None


def _autoscaler_env(spec: dict) -> Optional[str]:
    head = _containers(spec["headGroupSpec"])
    env = {e["name"]: e.get("value") for e in (head[0].get("env") or [])} if head else {}
    if not _autoscaling(spec) and env.get(AUTOSCALER_V2_ENV) in ("1", "true"):
        return f"environment variable {AUTOSCALER_V2_ENV} cannot be set when enableInTreeAutoscaling is false"
    if _autoscaling(spec) and AUTOSCALER_V2_ENV in env and (spec.get("autoscalerOptions") or {}).get("version"):
        return f"both .spec.autoscalerOptions.version and head Pod env var {AUTOSCALER_V2_ENV} are set"
    return None


def _suspended_groups(spec: dict) -> Optional[str]:
    for group in spec.get("workerGroupSpecs", []):
        if group.get("suspend"):
            return (f"worker group {group.get('groupName')} can be suspended only when the RayJobDeletionPolicy "
                    "feature gate is enabled (and never with the autoscaler)")
    return None


def _restart_policy_v2(spec: dict) -> Optional[str]:
    if not (_autoscaling(spec) and _autoscaler_v2(spec)):
        return None
    for name, group in _groups(spec):
        policy = ((group.get("template") or {}).get("spec") or {}).get("restartPolicy")
        if policy not in (None, "", "Never"):
            return f"restartPolicy for the {name} group's Pods should be Never or unset when using autoscaler V2"
    return None


def _idle_timeout(spec: dict) -> Optional[str]:
    idle = (spec.get("autoscalerOptions") or {}).get("idleTimeoutSeconds")
    return f"autoscalerOptions.idleTimeoutSeconds must be non-negative, got {idle}" if idle is not None and idle < 0 \
        else None


def _token_auth(spec: dict) -> Optional[str]:
    if (spec.get("authOptions") or {}).get("mode") != "token":
        return None
    version = spec.get("rayVersion")
    if not version:
        return "authOptions.mode is 'token' but RayVersion was not specified. Ray version 2.52.0 or later is required"
    parts = tuple(int(p) for p in re.findall(r"\d+", version)[:3])
    if parts < (2, 52, 0):
        return f"authOptions.mode is 'token' but minimum Ray version is 2.52.0, got {version}"
    return None


# --- metadata ------------------------------------------------------------------------------------------------

def _name(doc: dict) -> Optional[str]:
    name, limit = doc["metadata"].get("name", ""), MAX_RAYJOB_NAME if doc["kind"] == "RayJob" else MAX_RAYCLUSTER_NAME
    if len(name) > limit:
        return f"{doc['kind']} name should be no more than {limit} characters"
    if not DNS1035.match(name):
        return f"{doc['kind']} name should be a valid DNS1035 label"
    return None


# --- RayJob (ValidateRayJobSpec, validateDeletionConfiguration) ----------------------------------------------

def _job_deletion(doc: dict) -> Optional[str]:
    spec = doc["spec"]
    if spec.get("suspend") and not spec.get("shutdownAfterJobFinishes"):
        return "a RayJob with shutdownAfterJobFinishes set to false is not allowed to be suspended"
    ttl = spec.get("ttlSecondsAfterFinished", 0)
    if ttl < 0:
        return "TTLSecondsAfterFinished must be a non-negative integer"
    if ttl > 0 and not spec.get("shutdownAfterJobFinishes"):
        return "a RayJob with shutdownAfterJobFinishes set to false cannot have TTLSecondsAfterFinished"
    if spec.get("deletionStrategy"):
        return "DeletionStrategy needs the RayJobDeletionPolicy feature gate"
    return None


def _job_cluster(doc: dict) -> Optional[str]:
    spec = doc["spec"]
    selector = spec.get("clusterSelector") or {}
    if not spec.get("rayClusterSpec") and not selector:
        return "one of RayClusterSpec or ClusterSelector must be set"
    if selector:
        if spec.get("suspend"):
            return "the ClusterSelector mode doesn't support the suspend operation"
        if not selector.get(CLUSTER_SELECTOR_KEY):
            return "cluster name in ClusterSelector should not be empty"
        if spec.get("submissionMode") == "SidecarMode":
            return "ClusterSelector is not supported in SidecarMode"
        if (spec.get("backoffLimit") or 0) > 0:
            return "BackoffLimit is incompatible with ClusterSelector mode"
    return None


def _job_submission(doc: dict) -> Optional[str]:
    spec = doc["spec"]
    mode = spec.get("submissionMode")
    if mode == "InteractiveMode" and (spec.get("backoffLimit") or 0) > 0:
        return "BackoffLimit is incompatible with InteractiveMode"
    if mode == "SidecarMode" and (spec.get("submitterPodTemplate") or spec.get("submitterConfig")):
        return "SidecarMode doesn't support SubmitterPodTemplate or SubmitterConfig"
    return None


def _job_numbers(doc: dict) -> Optional[str]:
    spec = doc["spec"]
    for key in ("activeDeadlineSeconds", "preRunningDeadlineSeconds"):
        if spec.get(key) is not None and spec[key] <= 0:
            return f"{key} must be a positive integer"
    if spec.get("backoffLimit") is not None and spec["backoffLimit"] < 0:
        return "backoffLimit must be a positive integer"
    return None


def _job_runtime_env(doc: dict) -> Optional[str]:
    text = doc["spec"].get("runtimeEnvYAML")
    if text is None:
        return None
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as err:
        return f"runtimeEnvYAML is not valid YAML: {err}"
    return None if loaded is None or isinstance(loaded, dict) else "runtimeEnvYAML must be a YAML mapping"


# --- plants: one violation each, in a copy of a valid manifest ----------------------------------------------

def _plant_worker(doc: dict, **fields) -> None:
    spec = _first_spec(doc)
    spec.setdefault("workerGroupSpecs", [{"groupName": "extra", "template": {"spec": {"containers": [{}]}}}])
    spec["workerGroupSpecs"][0].update(fields)


def _plant_no_container(doc: dict) -> None:
    _first_spec(doc)["headGroupSpec"]["template"]["spec"]["containers"] = []


def _plant_bounds(doc: dict) -> None:
    _plant_worker(doc, minReplicas=3, maxReplicas=1)


def _plant_resources(doc: dict) -> None:
    head = _first_spec(doc)["headGroupSpec"]
    head.setdefault("rayStartParams", {})["num-cpus"] = "1"
    head["resources"] = {"CPU": "1"}


def _plant_labels(doc: dict) -> None:
    _first_spec(doc)["headGroupSpec"].setdefault("rayStartParams", {})["labels"] = "zone=a"


def _plant_autoscaler_env(doc: dict) -> None:
    spec = _first_spec(doc)
    spec["enableInTreeAutoscaling"] = False
    container = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    container["env"] = [*(container.get("env") or []), {"name": AUTOSCALER_V2_ENV, "value": "true"}]


def _plant_restart_policy(doc: dict) -> None:
    spec = _first_spec(doc)
    spec["enableInTreeAutoscaling"] = True
    spec.setdefault("autoscalerOptions", {})["version"] = "v2"
    spec["headGroupSpec"]["template"]["spec"]["restartPolicy"] = "Always"


def _plant_idle(doc: dict) -> None:
    _first_spec(doc).setdefault("autoscalerOptions", {})["idleTimeoutSeconds"] = -1


def _plant_token(doc: dict) -> None:
    spec = _first_spec(doc)
    spec["authOptions"] = {"mode": "token"}
    spec["rayVersion"] = "2.40.0"


def _plant_name(doc: dict) -> None:
    doc["metadata"]["name"] = "a-very-long-name-" * 4


def _plant_ttl(doc: dict) -> None:
    doc["spec"]["shutdownAfterJobFinishes"] = False
    doc["spec"]["ttlSecondsAfterFinished"] = 3600


def _plant_selector(doc: dict) -> None:
    doc["spec"].pop("rayClusterSpec", None)
    doc["spec"]["clusterSelector"] = {CLUSTER_SELECTOR_KEY: "perceive-ir"}
    doc["spec"]["backoffLimit"] = 2


def _plant_interactive(doc: dict) -> None:
    doc["spec"]["submissionMode"] = "InteractiveMode"
    doc["spec"]["backoffLimit"] = 1
    doc["spec"].pop("clusterSelector", None)


def _plant_deadline(doc: dict) -> None:
    doc["spec"]["activeDeadlineSeconds"] = 0


def _plant_runtime_env(doc: dict) -> None:
    doc["spec"]["runtimeEnvYAML"] = "env_vars: [unclosed"


def _plant_suspended_group(doc: dict) -> None:
    _plant_worker(doc, suspend=True)


CLUSTERS = ("RayCluster", "RayJob")
RULES = [
    Rule("ValidateRayClusterMetadata / ValidateRayJobMetadata: name length and DNS-1035", CLUSTERS, _name, _plant_name),
    Rule("ValidateRayClusterSpec: every group has a container", CLUSTERS, _each_spec(_containers_present),
         _plant_no_container),
    Rule("ValidateRayClusterSpec: replica bounds", CLUSTERS, _each_spec(_replica_bounds), _plant_bounds),
    Rule("validateRayGroupResources", CLUSTERS, _each_spec(_group_resources), _plant_resources),
    Rule("validateRayGroupLabels", CLUSTERS, _each_spec(_group_labels), _plant_labels),
    Rule("ValidateRayClusterSpec: RAY_enable_autoscaler_v2 and enableInTreeAutoscaling", CLUSTERS,
         _each_spec(_autoscaler_env), _plant_autoscaler_env),
    Rule("ValidateRayClusterSpec: suspended worker groups", CLUSTERS, _each_spec(_suspended_groups),
         _plant_suspended_group),
    Rule("ValidateRayClusterSpec: restartPolicy under autoscaler V2", CLUSTERS, _each_spec(_restart_policy_v2),
         _plant_restart_policy),
    Rule("ValidateRayClusterSpec: autoscalerOptions.idleTimeoutSeconds", CLUSTERS, _each_spec(_idle_timeout),
         _plant_idle),
    Rule("ValidateRayClusterSpec: token authentication needs Ray 2.52", CLUSTERS, _each_spec(_token_auth),
         _plant_token),
    Rule("ValidateRayJobSpec / validateDeletionConfiguration: TTL needs shutdownAfterJobFinishes", ("RayJob",),
         _job_deletion, _plant_ttl),
    Rule("ValidateRayJobSpec: cluster selector mode", ("RayJob",), _job_cluster, _plant_selector),
    Rule("ValidateRayJobSpec: submission modes", ("RayJob",), _job_submission, _plant_interactive),
    Rule("ValidateRayJobSpec: deadlines and backoffLimit", ("RayJob",), _job_numbers, _plant_deadline),
    Rule("ValidateRayJobSpec: runtimeEnvYAML is YAML", ("RayJob",), _job_runtime_env, _plant_runtime_env),
]


def violations(doc: dict) -> list[str]:
    """The controller's complaints about one manifest (empty for a manifest it accepts)."""
    return [f"{rule.name}: {found}" for rule in RULES if doc.get("kind") in rule.kinds
            if (found := rule.check(doc))]
