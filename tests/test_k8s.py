"""The Kubernetes manifests validate offline: core kinds against the Kubernetes schemas
(strict: unknown fields fail), KubeRay kinds against the CRDs, and no secret is inlined."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

from conftest import REPO

MANIFESTS = sorted((REPO / "k8s").glob("*.yaml")) + sorted((REPO / "k8s" / "jobs").glob("*.yaml"))
CRDS = REPO.parent / "shared" / "schemas" / "kuberay"
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY", re.I)


def documents():
    for path in MANIFESTS:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                yield path.relative_to(REPO), doc


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
        import jsonschema

        jsonschema.validate(doc, crd_schema(doc["kind"]))
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
    for path, doc in documents():
        if doc["kind"] != "RayJob":
            continue
        words = doc["spec"]["entrypoint"].split()
        script = REPO / words[words.index("python") + 1]
        config = REPO / words[words.index("--config") + 1]
        assert script.is_file() and config.is_file(), f"{path}: {script} or {config} is missing"
