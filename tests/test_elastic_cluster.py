"""An elastic stage-2 run on a three-node Ray cluster on this machine (``ray.cluster_utils.Cluster``):
a head without training slots and two one-slot nodes, a real ``mlflow server``, DeepSpeed workers.

The test removes a training node mid-run while the tracking server is down: the run goes on at one
worker from its last checkpoint, without waiting for a replacement, and without asking MLflow for
its perceiver (the driver staged it in the run storage). The server comes back, a node joins (``ray
start``), and the run grows back to two workers at Ray Train's next resize check. Then that node is
reclaimed as Kubernetes would: the preemption notice of its pod's preStop hook (``ray drain-node``),
a checkpoint within the grace period, SIGTERM to the node's processes; the run ends at its last step
on the remaining worker.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from _mlflow_server import MlflowServer
from _run_storage import checkpoint_states as _checkpoints
from _run_storage import wait_for as _wait
from _model_fixtures import TINY_CLIP_JSON, tiny_clip_file, tiny_perceiver
from _train_fixtures import build_tiny_shards
from conftest import REPO

pytestmark = pytest.mark.slow

STEPS = 360
GRACE_S = 60  # between the preemption notice and the node's end
SLOT = {"training_slot": 1.0}


def _perceiver_run(server: MlflowServer, folder: Path) -> str:
    """A stage-1 run holding a tiny perceiver product; returns its runs:/ URI. (Through a client: MLflow's
    fluent API would leave the server's address in this process's environment for later tests.)"""
    from mlflow.tracking import MlflowClient

    from perceive_ir.models import PerceiverConfig
    from perceive_ir.products.folders import save_perceiver

    folder.mkdir(parents=True, exist_ok=True)
    clip = tiny_clip_file(folder / "clip.safetensors", seed=0)
    cfg = PerceiverConfig(architecture="clip_tiny", pretrained=None, clip_weights=str(clip),
                          arch_config=str(TINY_CLIP_JSON))
    product = save_perceiver(tiny_perceiver(clip), cfg, folder / "perceiver")
    client = MlflowClient(tracking_uri=server.uri)
    run = client.create_run(client.create_experiment("elastic-inputs"))
    client.log_artifacts(run.info.run_id, str(product), "perceiver")
    client.set_terminated(run.info.run_id)
    return f"runs:/{run.info.run_id}/perceiver"


def test_a_lost_node_shrinks_the_run_and_a_returned_one_grows_it_back(package_photos, tmp_path, monkeypatch):
    import ray
    from mlflow.tracking import MlflowClient
    from ray.cluster_utils import Cluster

    from perceive_ir.config import load_config
    from perceive_ir.orchestration.config import Stage2Config
    from perceive_ir.orchestration.trainer import launch

    monkeypatch.chdir(REPO)
    # what the job's settings put in this process's environment goes with the test
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "20")
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    server = MlflowServer(tmp_path / "mlflow")
    (tmp_path / "mlflow").mkdir()
    server.start()
    perceiver = _perceiver_run(server, tmp_path / "stage1")
    # nodes found dead within seconds (Ray's defaults take about 30 s)
    fast_health_checks = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500,
                          "health_check_timeout_ms": 500, "health_check_failure_threshold": 3}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "_system_config": fast_health_checks})
    training_nodes = [cluster.add_node(num_cpus=1, resources=SLOT) for _ in range(2)]
    storage, shards = tmp_path / "ray", build_tiny_shards(package_photos, str(tmp_path / "shards"))
    cfg = load_config(Stage2Config, REPO / "configs/stage2_tiny.yaml", [
        "name=elastic", f"perceiver={perceiver}", f"data.train.sources=[{{location: {shards}}}]",
        "data.train.patch_size=32", "data.train.batch_size=2", "data.train.samples_per_epoch=16",
        "data.validation.images=2", "data.validation.types=[haze]", "data.validation.patch_size=32",
        "loss.identity=0",
        f"loop.max_steps={STEPS}", "loop.log_every=1", "loop.checkpoint_every=5", f"loop.val_every={STEPS}",
        f"tracking.uri={server.uri}", "tracking.experiment=elastic", "tracking.retry_max_interval_s=2",
        f"storage.path={storage}", "storage.keep_last=100", "storage.max_failures=4",
        f"ray.address={cluster.address}", "ray.num_workers=[1, 2]", "ray.resize_check_s=2",
        "ray.resources_per_worker={CPU: 1, training_slot: 1}", "ray.health_check_interval_s=0.2",
        "ray.worker_start_timeout_s=20",
    ])
    seen: dict[str, object] = {}
    returned: list[subprocess.Popen] = []

    def drill() -> None:
        try:
            _wait(lambda: any(s["step"] >= 10 and s["world_size"] == 2 for s in _checkpoints(storage)),
                  "a checkpoint at two workers")
            server.stop()  # the outage covers the shrink: worker starts must not need the store
            seen["lost_at"] = time.monotonic()
            cluster.remove_node(training_nodes[1])
            shrunk = _wait(lambda: [s for s in _checkpoints(storage) if s["world_size"] == 1], "a checkpoint at one worker")
            seen["shrunk_s"] = time.monotonic() - seen["lost_at"]
            seen["shrunk_at_step"] = shrunk[0]["step"]
            server.start()
            returned.append(subprocess.Popen(  # a node joining the cluster, as on a new machine
                [str(Path(sys.executable).parent / "ray"), "start", "--address", cluster.address, "--block",
                 "--num-cpus", "1", "--resources", json.dumps(SLOT)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
            seen["returned_at"] = time.monotonic()
            grown = _wait(lambda: [s for s in _checkpoints(storage)
                                   if s["world_size"] == 2 and s["step"] > shrunk[0]["step"]], "a checkpoint at two again")
            seen["grown_s"] = time.monotonic() - seen["returned_at"]
            seen["grown_at_step"] = grown[0]["step"]
            # the returned node is reclaimed: first the notice its pod's preStop hook gives (k8s/40-raycluster.yaml),
            # then SIGTERM to the node's processes
            node_id = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and "training_slot" in n["Resources"]
                           and n["NodeID"] != training_nodes[0].node_id)
            subprocess.run([str(Path(sys.executable).parent / "ray"), "drain-node", "--address", cluster.address,
                            "--node-id", node_id, "--reason", "DRAIN_NODE_REASON_PREEMPTION",
                            "--reason-message", "spot reclaim", "--deadline-remaining-seconds", str(GRACE_S)],
                           check=True, capture_output=True)
            noticed = time.monotonic()
            _wait(lambda: [s for s in _checkpoints(storage) if s["preempted"]], "a checkpoint on the preemption notice",
                  timeout_s=GRACE_S)
            seen["preemption_checkpoint_s"] = time.monotonic() - noticed
            # the node goes at the end of the grace period; here once Ray Train has registered that checkpoint
            # (the next one is written after every rank reported it)
            _wait(lambda: len([s for s in _checkpoints(storage) if s["preempted"]]) >= 2,
                  "the checkpoint after the preemption notice", timeout_s=GRACE_S)
            os.killpg(returned[0].pid, signal.SIGTERM)
            returned[0].wait(timeout=60)
            seen["reclaimed_at"] = time.monotonic()
        except BaseException as err:  # noqa: BLE001 - reported by the test
            seen["error"] = err

    watcher = threading.Thread(target=drill, daemon=True)
    watcher.start()
    try:
        result = launch("stage2", cfg, working_dir=REPO)
    finally:
        ray.shutdown()
        for node in returned:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGTERM)
                node.wait(timeout=60)
        cluster.shutdown()
    watcher.join(timeout=60)
    try:
        assert "error" not in seen, seen.get("error")
        assert "grown_at_step" in seen, f"the run ended before the node returned: {seen}"
        client = MlflowClient(tracking_uri=server.uri)
        run = client.get_run(result.run_id)
        assert run.info.status == "FINISHED"
        sizes = [int(m.value) for m in sorted(client.get_metric_history(result.run_id, "train/world_size"),
                                              key=lambda m: (m.step, m.timestamp))]
        assert [size for i, size in enumerate(sizes) if i == 0 or size != sizes[i - 1]] == [2, 1, 2, 1]
        steps = {m.step for m in client.get_metric_history(result.run_id, "train/total")}
        assert steps == set(range(1, STEPS + 1))  # every step logged, through the outage and both resizes
        resizes = {k: v for k, v in run.data.tags.items() if k.startswith("elastic.resize.")}
        assert any("2 -> 1 workers (capacity lost" in v for v in resizes.values()), resizes
        assert any("1 -> 2 workers (capacity returned" in v for v in resizes.values()), resizes
        assert any("2 -> 1 workers (preemption" in v for v in resizes.values()), resizes
        assert client.get_metric_history(result.run_id, "elastic/restart_lost_s")
        assert "staged" not in json.dumps(run.data.params)  # staging is plumbing, not a setting
        assert list(storage.glob("elastic/inputs/perceiver-*/perceiver.json"))
        assert [a.path for a in client.list_artifacts(result.run_id, "elastic")] == ["elastic/world_size.png"]
        print(f"node lost -> first checkpoint at 1 worker: {seen['shrunk_s']:.1f} s; node added -> first "
              f"checkpoint at 2 workers: {seen['grown_s']:.1f} s; preemption notice -> checkpoint: "
              f"{seen['preemption_checkpoint_s']:.1f} s")
    finally:
        server.stop()
