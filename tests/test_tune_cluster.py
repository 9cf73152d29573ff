"""A search on a multi-node Ray cluster on this machine (``ray.cluster_utils.Cluster``): a head, two
stable nodes that alone offer ``stable_node`` (where the trial functions and their Train controllers
must run, as the Kubernetes head and CPU group do) and two one-slot training nodes; a real
``mlflow server``; two trials at once, each a stage-2 Ray Train + DeepSpeed run of one worker.

The tracking server is stopped once both trials have validated; each validates again during the
outage; then the stable node holding a trial function is killed (SIGKILL to its processes). Tune
restarts the trial on the other stable node (``FailureConfig``); it waits for the store, which comes
back a little later, and its run resumes from its last checkpoint. Every trial completes, and every
validation (those during the outage included) reached Tune.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import yaml

from _mlflow_server import MlflowServer
from _run_storage import wait_for
from _model_fixtures import TINY_CLIP_JSON, tiny_clip_file, tiny_perceiver
from _train_fixtures import build_tiny_shards
from conftest import REPO

pytestmark = pytest.mark.slow

SEARCH = "tune-cluster"
MAX_STEPS = 60
VAL_EVERY = 10
STABLE = {"stable_node": 1.0}
SLOT = {"training_slot": 1.0}
STORE_AWAY_S = 10  # after the node's loss


def _search_config(root: Path, shards: str, perceiver: Path, tracking_uri: str, address: str) -> Path:
    search = {
        "name": SEARCH, "base": "configs/stage2_tiny.yaml",
        "stage2": {
            "perceiver": str(perceiver),
            "data": {"train": {"sources": [{"location": shards}], "samples_per_epoch": 24, "patch_size": 32,
                               "batch_size": 2},
                     "validation": {"images": 2, "patch_size": 32, "types": ["haze"]}},
            "loop": {"max_steps": MAX_STEPS, "val_every": VAL_EVERY, "log_every": 1},
            "loss": {"identity": 0},
            "optimizer": {"warmup_steps": 0},
            "ray": {"address": address, "num_workers": 1, "resources_per_worker": {"CPU": 1, **SLOT},
                    "health_check_interval_s": 0.2},
            "storage": {"path": str(root / "ray"), "keep_last": 100},
            "tracking": {"uri": tracking_uri, "experiment": SEARCH, "retry_max_interval_s": 2},
        },
        "space": {"optimizer.lr": {"grid": [1e-3, 3e-3]}},
        "num_trials": 1, "concurrency": 2,
        "scheduler": {"name": "fifo"},
        "trial_driver_resources": {"stable_node": 0.01},
        "max_trial_failures": 2,
        "state_save_period_s": 1,
    }
    path = root / "search.yaml"
    path.write_text(yaml.safe_dump(search, sort_keys=False))
    return path


def _trial_checkpoints(train_storage: Path) -> dict[str, list[int]]:
    """Run name -> the steps of its complete checkpoints (each one a validation here)."""
    found: dict[str, list[int]] = {}
    for state in train_storage.glob("*/checkpoint_*/trainer_state.json"):
        try:
            found.setdefault(state.parts[-3], []).append(json.loads(state.read_text())["step"])
        except ValueError:  # being written
            continue
    return {run: sorted(steps) for run, steps in found.items()}


def _actors_on(node_id: str) -> list[str]:
    from ray.util.state import list_actors

    return [a.class_name for a in list_actors(filters=[("node_id", "=", node_id), ("state", "=", "ALIVE")])]


def test_a_trial_whose_node_is_lost_during_a_tracking_outage_resumes_and_completes(package_photos, tmp_path,
                                                                                    monkeypatch):
    import ray
    from mlflow.tracking import MlflowClient
    from ray.cluster_utils import Cluster

    from perceive_ir.models import PerceiverConfig
    from perceive_ir.products.folders import save_perceiver
    from perceive_ir.search import plan_search
    from perceive_ir.search.runner import run_search

    monkeypatch.chdir(REPO)
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    clip = tiny_clip_file(tmp_path / "clip.safetensors", seed=0)
    perceiver_cfg = PerceiverConfig(architecture="clip_tiny", pretrained=None, clip_weights=str(clip),
                                    arch_config=str(TINY_CLIP_JSON))
    perceiver = save_perceiver(tiny_perceiver(clip), perceiver_cfg, tmp_path / "perceiver")
    server = MlflowServer(tmp_path / "mlflow")
    (tmp_path / "mlflow").mkdir()
    server.start()
    fast_health_checks = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500,
                          "health_check_timeout_ms": 500, "health_check_failure_threshold": 3}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "_system_config": fast_health_checks})
    stable_nodes = [cluster.add_node(num_cpus=0, resources=STABLE) for _ in range(2)]
    for _ in range(2):
        cluster.add_node(num_cpus=1, resources=SLOT)
    shards = build_tiny_shards(package_photos, str(tmp_path / "shards"))
    plan = plan_search(_search_config(tmp_path, shards, perceiver, server.uri, cluster.address))
    train_storage = tmp_path / "ray" / SEARCH / "train"
    seen: dict[str, object] = {}

    def drill() -> None:
        try:
            before = wait_for(lambda: (lambda c: c if len(c) == 2 and all(c.values()) else None)(
                _trial_checkpoints(train_storage)), "a validation of both trials", timeout_s=400)
            server.stop()
            seen["outage_from"] = {run: steps[-1] for run, steps in before.items()}
            wait_for(lambda: all(steps[-1] > seen["outage_from"][run]
                                 for run, steps in _trial_checkpoints(train_storage).items()),
                     "a validation of each trial during the outage")
            node = max(stable_nodes, key=lambda n: len(_actors_on(n.node_id)))
            seen["killed_actors"] = _actors_on(node.node_id)
            assert "_AutoscalingCoordinatorActor" not in seen["killed_actors"]  # the driver placed it on the head
            seen["at_kill"] = _trial_checkpoints(train_storage)
            seen["lost_at"] = time.time()
            cluster.remove_node(node, allow_graceful=False)
            time.sleep(STORE_AWAY_S)  # the restarted trial finds the store away and waits
            server.start()
        except BaseException as err:  # noqa: BLE001 - reported by the test
            seen["error"] = err

    watcher = threading.Thread(target=drill, daemon=True)
    watcher.start()
    try:
        result = run_search(plan, REPO)
    finally:
        ray.shutdown()
        cluster.shutdown()
    watcher.join(timeout=60)
    try:
        assert "error" not in seen, seen.get("error")
        assert "lost_at" in seen, f"the search ended before the drill: {seen}"
        print(f"killed a stable node holding {seen['killed_actors']}")
        assert result.outcome.completed == 2 and not result.outcome.errors, result.outcome.error_lines()
        client = MlflowClient(tracking_uri=server.uri)
        runs = {r.info.run_name: r for r in client.search_runs(
            [client.get_experiment_by_name(SEARCH).experiment_id], "tags.`search.name` = 'tune-cluster'")}
        assert {r.info.status for r in runs.values()} == {"FINISHED"}, runs
        restarted = [name for name, r in runs.items() if r.data.tags.get("launches") == "2"]
        assert restarted, "no trial was restarted: the killed node held no trial"
        for name in restarted:
            run_id = runs[name].info.run_id
            logged = client.get_metric_history(run_id, "train/total")
            # what the killed worker had not yet sent to the store is lost with it (its buffer is in memory);
            # everything after its checkpoint is there
            after_loss = [m for m in logged if m.timestamp / 1000 > seen["lost_at"]]
            resumed_from = min(m.step for m in after_loss) - 1
            assert resumed_from >= seen["at_kill"][name][-1], \
                f"{name} resumed from step {resumed_from}, not from its last checkpoint {seen['at_kill'][name]}"
            assert set(range(resumed_from + 1, MAX_STEPS + 1)) <= {m.step for m in logged}
            first_after = min(m.timestamp for m in after_loss) / 1000
            print(f"{name}: node lost -> first resumed step {first_after - seen['lost_at']:.1f} s (the store "
                  f"away for the first {STORE_AWAY_S} s)")
        # every validation reached Tune, those during the outage included
        for trial_dir in (tmp_path / "ray" / SEARCH).glob("run_trial_*"):
            reported = [json.loads(line)["step"] for line in (trial_dir / "result.json").read_text().splitlines()]
            assert sorted(set(reported)) == list(range(VAL_EVERY, MAX_STEPS + 1, VAL_EVERY)), (trial_dir.name, reported)
        assert len(list((tmp_path / "ray" / SEARCH).glob("run_trial_*"))) == 2
    finally:
        server.stop()
