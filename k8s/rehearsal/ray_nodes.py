"""The RayCluster as local Ray nodes: the ``ray start`` command KubeRay's operator generates for each pod
(its rayStartParams, and CPUs and memory from the container's limits), one pod per replica.

Mapped for one machine: a pod's ``nvidia.com/gpu: N`` becomes the custom resource ``rehearsal_gpu: N``
(the rehearsal overlay's jobs ask for it instead of GPUs), every node has the address 127.0.0.1 and ports
of its own, and the object store is capped at 512 MiB a node. Each node keeps its session files in its
pod's own temporary folder (``--temp-dir``: without it a joining node takes the head's path, which in
pods is a folder of each pod's own, but on one machine the same folder)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from rehearsal.manifests import Manifests, ServiceMap, free_port
from rehearsal.pods import POD_TMP, Pod, PodSet, port_open, wait_until

__all__ = ["RayCluster", "GPU_STAND_IN", "quantity"]

GPU_STAND_IN = "rehearsal_gpu"
OBJECT_STORE_CAP = 512 * 2**20
_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9, "m": 1e-3}


def quantity(value) -> float:
    """A Kubernetes quantity ("8", "500m", "64Gi") as a number."""
    text = str(value)
    for suffix, factor in sorted(_UNITS.items(), key=lambda kv: -len(kv[0])):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


@dataclass
class NodeGroup:
    name: str
    spec: dict  # headGroupSpec or one of workerGroupSpecs
    head: bool

    @property
    def container(self) -> dict:
        return self.spec["template"]["spec"]["containers"][0]

    @property
    def replicas(self) -> int:
        return 1 if self.head else int(self.spec.get("replicas", self.spec.get("minReplicas", 0)))


class RayCluster:
    """Start, lose and replace the cluster's nodes; ``dashboard`` is the head Service's address."""

    def __init__(self, manifests: Manifests, services: ServiceMap, name: str, pods: PodSet, image: Path):
        self.doc = manifests.get("RayCluster", name)
        self.manifests, self.services, self.pods, self.image = manifests, services, pods, image
        self.service = f"{name}-head-svc"  # the Service KubeRay creates for the head
        head = self.doc["spec"]["headGroupSpec"]
        self.groups = [NodeGroup("head", head, True)] + [NodeGroup(g["groupName"], g, False)
                                                         for g in self.doc["spec"].get("workerGroupSpecs", [])]
        for port in self.groups[0].container.get("ports", []):
            services.add(self.service, port["containerPort"])
        self.nodes: list[Pod] = []

    @property
    def gcs(self) -> str:
        return f"127.0.0.1:{self.services.local(self.service, 6379)}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.services.local(self.service, 8265)}"

    def _command(self, group: NodeGroup, pod_name: str) -> list[str]:
        params = {k: str(v) for k, v in group.spec.get("rayStartParams", {}).items()}
        limits = group.container.get("resources", {}).get("limits") or group.container.get("resources", {}).get(
            "requests", {})
        params.setdefault("num-cpus", str(int(quantity(limits.get("cpu", 1)))))
        memory = int(quantity(limits.get("memory", "2Gi")))
        params.setdefault("memory", str(memory))
        params.setdefault("object-store-memory", str(min(OBJECT_STORE_CAP, int(0.3 * memory))))
        gpus = int(quantity(limits.get("nvidia.com/gpu", 0)))
        if gpus:
            resources = json.loads(params.get("resources", "{}").strip("'\"` ") or "{}")
            params["resources"] = json.dumps({**resources, GPU_STAND_IN: gpus})
        if "resources" in params:  # a JSON object in shell quotes, as KubeRay passes it to bash
            params["resources"] = json.dumps(json.loads(params["resources"].strip("'\"` ") or "{}"))
        if params.get("dashboard-host") == "0.0.0.0":
            params["dashboard-host"] = "127.0.0.1"
        params.update({"node-name": pod_name, "node-ip-address": "127.0.0.1", "temp-dir": f"{POD_TMP}/ray",
                       "dashboard-agent-listen-port": str(free_port()),
                       "metrics-export-port": str(free_port())})
        if group.head:
            params.update({"port": str(self.services.local(self.service, 6379)),
                           "dashboard-port": str(self.services.local(self.service, 8265)),
                           "ray-client-server-port": str(self.services.local(self.service, 10001))})
            start = ["ray", "start", "--head"]
        else:
            start = ["ray", "start", f"--address={self.gcs}"]
        return start + [f"--{k}={v}" for k, v in params.items()] + ["--block"]

    def start_node(self, group: NodeGroup, index: int) -> Pod:
        name = f"{self.doc['metadata']['name']}-{group.name}-{index}"
        env = {k: self.services.translate(v)
               for k, v in self.manifests.environment(group.container, f"RayCluster/{group.name}").items()}
        env.update({"RAY_CLUSTER_NAME": self.doc["metadata"]["name"], "RAY_USAGE_STATS_KUBERAY_IN_USE": "1"})
        if group.head:
            env["RAY_ADDRESS"] = self.gcs
        pod = self.pods.start(name, self._command(group, name), env, self.image, group=group.name)
        self.nodes.append(pod)
        return pod

    def start(self, timeout_s: float = 180.0) -> None:
        head = self.start_node(self.groups[0], 0)
        wait_until(lambda: port_open(self.services.local(self.service, 8265)), timeout_s, "the Ray head", head)
        self.wait_for_nodes(timeout_s)
        for group in self.groups[1:]:  # one after the other: two cores do not start three raylets in time
            for index in range(group.replicas):
                self._start_with_restarts(group, index, timeout_s)

    def _start_with_restarts(self, group: NodeGroup, index: int, timeout_s: float, restarts: int = 2) -> Pod:
        """A pod whose container exits while starting is started again, as the kubelet restarts it (a
        raylet can time out registering on a loaded machine)."""
        for attempt in range(restarts + 1):
            pod = self.start_node(group, index)
            try:
                self.wait_for_nodes(timeout_s)
                return pod
            except RuntimeError:  # it exited
                if attempt == restarts:
                    raise
                pod.stop(grace_s=5)
                self.nodes.remove(pod)
        raise AssertionError("unreachable")

    def alive_nodes(self) -> list:
        from ray.util.state import list_nodes

        return list_nodes(address=self.dashboard, filters=[("state", "=", "ALIVE")], raise_on_missing_output=False)

    def wait_for_nodes(self, timeout_s: float) -> None:
        expected = sum(1 for pod in self.nodes if pod.running())
        wait_until(lambda: len(self.alive_nodes()) >= expected, timeout_s, f"{expected} Ray nodes alive",
                   self.nodes[-1])

    def replace(self, lost: Pod, timeout_s: float = 180.0) -> Pod:
        """What the operator does for a worker pod whose container exited: a new pod of the same group."""
        lost.stop(grace_s=5)
        group = next(g for g in self.groups if g.name == lost.group)
        return self._start_with_restarts(group, int(lost.name.rsplit("-", 1)[1]), timeout_s)
