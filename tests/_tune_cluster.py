"""A search on a multi-node Ray cluster on this machine, and the loss of a trial's node during it.

The cluster (``ray.cluster_utils.Cluster``): a head, two stable nodes that alone offer ``stable_node``
(where the trial functions and their Train controllers run, as the Kubernetes head and CPU group do)
and two one-slot training nodes; a real ``mlflow server``; two trials at once, each a stage-2 Ray
Train + DeepSpeed run of one worker. Used by tests/test_tune_cluster.py and benchmarks/bench_tune.py.

The drill: once both trials have validated, the tracking server is stopped (for ``store_away_s`` > 0);
each trial validates again during the outage; then the stable node holding a trial function is
killed (SIGKILL to its processes), and the server comes back ``store_away_s`` later.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from _mlflow_server import MlflowServer
from _model_fixtures import TINY_CLIP_JSON, tiny_clip_file, tiny_perceiver
from _run_storage import wait_for
from _train_fixtures import build_tiny_shards

REPO = Path(__file__).resolve().parents[1]
SEARCH = "tune-cluster"
STABLE = {"stable_node": 1.0}
SLOT = {"training_slot": 1.0}


@dataclass
class Drill:
    result: object  # the search's SearchResult
    server: MlflowServer  # running again; the caller stops it
    experiment_root: Path  # Tune's experiment folder
    train_storage: Path  # the trials' Train runs
    seen: dict = field(default_factory=dict)  # moments and checkpoints of the drill


def _search_config(root: Path, shards: str, perceiver: Path, tracking_uri: str, address: str, max_steps: int,
                   val_every: int) -> Path:
    search = {
        "name": SEARCH, "base": "configs/stage2_tiny.yaml",
        "stage2": {
            "perceiver": str(perceiver),
            "data": {"train": {"sources": [{"location": shards}], "samples_per_epoch": 24, "patch_size": 32,
                               "batch_size": 2},
                     "validation": {"images": 2, "patch_size": 32, "types": ["haze"]}},
            "loop": {"max_steps": max_steps, "val_every": val_every, "log_every": 1},
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


def trial_checkpoints(train_storage: Path) -> dict[str, list[int]]:
    """Run name -> the steps of its complete checkpoints (each one a validation here)."""
    found: dict[str, list[int]] = {}
    for state in train_storage.glob("*/checkpoint_*/trainer_state.json"):
        try:
            found.setdefault(state.parts[-3], []).append(json.loads(state.read_text())["step"])
        except ValueError:  # being written
            continue
    return {run: sorted(steps) for run, steps in found.items()}


def _alive_actors() -> dict[str, list[str]]:
    """Node id -> the classes of its alive actors, read from the GCS this driver is connected to (not the
    state API, which finds its dashboard by the machine's last `ray start` or port 8265, either of which
    may belong to another Ray on the machine)."""
    from ray._private.state import actors

    found: dict[str, list[str]] = {}
    for a in actors().values():
        if a["State"] == "ALIVE":
            found.setdefault(a.get("Address", {}).get("NodeID", "?"), []).append(a["ActorClassName"])
    return found


def _actors_on(node_id: str) -> list[str]:
    """The classes of a node's alive actors by their short names: Ray reports a trial function as
    ``ImplicitFunc``, or as ``wrap_function.<locals>.ImplicitFunc`` once its process has run a search before."""
    return [name.rsplit(".", 1)[-1] for name in _alive_actors().get(node_id, [])]


def node_loss_drill(root: Path, photos: Path, store_away_s: float, max_steps: int = 150, val_every: int = 10) -> Drill:
    """Run the search through the drill (see the module's docstring); the caller checks what came of it."""
    import ray
    from ray.cluster_utils import Cluster

    from perceive_ir.models import PerceiverConfig
    from perceive_ir.products.folders import save_perceiver
    from perceive_ir.search import plan_search
    from perceive_ir.search.runner import run_search

    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.2"
    clip = tiny_clip_file(root / "clip.safetensors", seed=0)
    perceiver_cfg = PerceiverConfig(architecture="clip_tiny", pretrained=None, clip_weights=str(clip),
                                    arch_config=str(TINY_CLIP_JSON))
    perceiver = save_perceiver(tiny_perceiver(clip), perceiver_cfg, root / "perceiver")
    (root / "mlflow").mkdir()
    server = MlflowServer(root / "mlflow")
    server.start()
    fast_health_checks = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500,
                          "health_check_timeout_ms": 500, "health_check_failure_threshold": 3}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "_system_config": fast_health_checks})
    stable_nodes = [cluster.add_node(num_cpus=0, resources=STABLE) for _ in range(2)]
    for _ in range(2):
        cluster.add_node(num_cpus=1, resources=SLOT)
    shards = build_tiny_shards(photos, str(root / "shards"))
    plan = plan_search(_search_config(root, shards, perceiver, server.uri, cluster.address, max_steps, val_every))
    drill = Drill(None, server, root / "ray" / SEARCH, root / "ray" / SEARCH / "train")
    seen = drill.seen

    def run_drill() -> None:
        try:
            before = wait_for(lambda: (lambda c: c if len(c) == 2 and all(c.values()) else None)(
                trial_checkpoints(drill.train_storage)), "a validation of both trials", timeout_s=400)
            if store_away_s:
                server.stop()
            seen["outage_from"] = {run: steps[-1] for run, steps in before.items()}
            wait_for(lambda: all(steps[-1] > seen["outage_from"][run]
                                 for run, steps in trial_checkpoints(drill.train_storage).items()),
                     "a validation of each trial during the outage")
            try:
                node = wait_for(lambda: next((n for n in stable_nodes if "ImplicitFunc" in _actors_on(n.node_id)),
                                             None), "a stable node running a trial function", timeout_s=120)
            except TimeoutError as err:
                raise TimeoutError(f"{err}; stable nodes {[n.node_id for n in stable_nodes]}, alive actors by "
                                   f"node {_alive_actors()}") from None
            seen["killed_actors"] = _actors_on(node.node_id)
            seen["at_kill"] = trial_checkpoints(drill.train_storage)
            seen["lost_at"] = time.time()
            cluster.remove_node(node, allow_graceful=False)
            if store_away_s:
                time.sleep(store_away_s)  # a restarted trial finds the store away and waits
                server.start()
        except BaseException as err:  # noqa: BLE001 - reported by the caller
            seen["error"] = err
            if server.process is None or server.process.poll() is not None:
                server.start()  # the search goes on to its end, and the caller reports the error

    watcher = threading.Thread(target=run_drill, daemon=True)
    watcher.start()
    try:
        drill.result = run_search(plan, REPO)
    finally:
        ray.shutdown()
        cluster.shutdown()
        os.environ.pop("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", None)
    watcher.join(timeout=60)
    if server.process is None or server.process.poll() is not None:
        server.start()  # the drill failed while the store was away
    return drill


def resumed_runs(drill: Drill) -> dict[str, dict]:
    """For each trial run launched twice (its function was on the lost node): the step it resumed
    from, the steps it logged, and the seconds from the node's loss to its first resumed step; and
    for comparison, the seconds from its first launch to its first step."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=drill.server.uri)
    experiment = client.get_experiment_by_name(SEARCH)
    out = {}
    for run in client.search_runs([experiment.experiment_id], f"tags.`search.name` = '{SEARCH}'"):
        if run.data.tags.get("launches") != "2":
            continue
        logged = client.get_metric_history(run.info.run_id, "train/total")
        after = [m for m in logged if m.timestamp / 1000 > drill.seen["lost_at"]]
        if not after:
            raise AssertionError(f"{run.info.run_name} logged no step after the node's loss: it had ended by then")
        first_after = min(after, key=lambda m: m.timestamp)
        out[run.info.run_name] = {
            "status": run.info.status, "steps": {m.step for m in logged},
            "resumed_from": min(m.step for m in after) - 1,
            "loss_to_resumed_s": first_after.timestamp / 1000 - drill.seen["lost_at"],
            "start_to_first_step_s": (min(m.timestamp for m in logged) - run.info.start_time) / 1000,
        }
    return out
