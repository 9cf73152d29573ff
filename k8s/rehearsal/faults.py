"""Multi-node behaviour of stage 2: where its training workers run, a worker node lost mid-run (its raylet
killed with SIGKILL), the node started again, and what each node kept in its own cache."""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field
from typing import Callable

from rehearsal.pods import Pod, wait_until
from rehearsal.ray_nodes import RayCluster

__all__ = ["NodeLoss", "training_worker_nodes", "product_cache_entries"]


def training_worker_nodes(cluster: RayCluster) -> dict[str, str]:
    """Alive Ray Train workers: actor id -> the name of the node (pod) it runs on."""
    from ray.util.state import list_actors, list_nodes

    names = {n.node_id: n.node_name for n in list_nodes(address=cluster.dashboard, raise_on_missing_output=False)}
    actors = list_actors(address=cluster.dashboard, filters=[("class_name", "=", "RayTrainWorker"),
                                                              ("state", "=", "ALIVE")],
                         raise_on_missing_output=False)
    return {a.actor_id: names.get(a.node_id, a.node_id) for a in actors}


def product_cache_entries(pod: Pod) -> list[str]:
    """The complete entries of the node's product cache (``perceive_ir.data.node_cache``), in its own /tmp."""
    return sorted(p.parent.name for p in pod.tmp.glob("perceive_ir_cache/*/products/*/.product.json"))


@dataclass
class NodeLoss:
    """Called while stage 2 runs: once ``checkpoint_written()`` says a checkpoint is reported, note where
    the workers are, kill the raylet of a node that hosts one; once ``shrunk()`` says the (elastic) run
    checkpointed at fewer workers, start a node again in its place and wait for the run to grow back."""

    cluster: RayCluster
    checkpoint_written: Callable[[], bool]
    shrunk: Callable[[], bool]
    timeout_s: float = 240.0
    placement: dict[str, str] = field(default_factory=dict)
    lost: str = ""
    replacement: str = ""
    seconds_to_shrink: float = 0.0
    seconds_to_replace: float = 0.0
    seconds_to_grow: float = 0.0

    def __call__(self, submitter: Pod, job_id: str) -> None:
        wait_until(lambda: self.checkpoint_written() and len(training_worker_nodes(self.cluster)) >= 2,
                   self.timeout_s, "stage 2's checkpoints with its workers up", submitter)
        self.placement = training_worker_nodes(self.cluster)
        victim = next(pod for pod in self.cluster.nodes if pod.running() and pod.name in self.placement.values())
        raylet = next(p for p in victim.processes() if p.name() == "raylet")
        start = time.perf_counter()
        raylet.send_signal(signal.SIGKILL)
        self.lost = victim.name
        try:  # `ray start --block` ends when its raylet dies: the container exits, the pod is restarted
            victim.process.wait(timeout=60)
        except Exception:  # noqa: BLE001 - it did not notice: the kubelet's liveness probe would restart it
            pass
        # a lost machine takes minutes to come back: the run goes on without it meanwhile
        wait_until(self.shrunk, self.timeout_s, "stage 2 to go on at fewer workers", submitter)
        self.seconds_to_shrink = time.perf_counter() - start
        new = self.cluster.replace(victim)
        self.replacement = f"{new.name} (pod folder {new.folder.name})"
        self.seconds_to_replace = time.perf_counter() - start
        # Ray Train sees the node at its resource coordinator's next tick (every 20 s), then restarts the group
        wait_until(lambda: len(training_worker_nodes(self.cluster)) >= 2, self.timeout_s,
                   "stage 2 to grow back to two workers (its run may have ended first: raise loop.max_steps)",
                   submitter)
        self.seconds_to_grow = time.perf_counter() - start


