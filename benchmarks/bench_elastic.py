"""What a resize of an elastic run costs, and what it is made of, on a Ray cluster on this machine
(``ray.cluster_utils``: a head and two one-slot training nodes), with the tiny stage 2:

1. node loss: from the removal of a training node to the first step at one worker, split into
   detection (Ray marks the node dead), restart (a new worker group, including any start attempt that
   still counted the lost node) and checkpoint load (read, copy and load, as the worker logged it);
2. node return: from a new node's ``ray start`` to the first step at two workers (Ray Train's resize
   check, the restart and the load).

    python benchmarks/bench_elastic.py [--steps 400] [--worker-start-timeout 20] [--gpu] [--plot-to FILE]

``--gpu``: the workers on the GPU (bf16); with one GPU the run has one worker, so 1. measures a node
replacement at one worker and 2. is skipped. Figures come from the run's metrics (the MLflow
timestamps of ``train/world_size`` and ``elastic/restart_lost_s``) and from polling Ray's node table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "platform"), str(REPO), str(REPO / "tests")]

SLOT = {"training_slot": 1.0}

from _run_storage import checkpoint_states, wait_for  # noqa: E402


def inputs(root: Path) -> tuple[str, Path]:
    import yaml

    from _train_fixtures import build_tiny_shards
    from perceive_ir.config import from_dict
    from perceive_ir.data.package_photos import copy_photos
    from perceive_ir.models import PerceiverConfig
    from perceive_ir.products import ensure_clip_weights, save_perceiver

    photos = root / "photos"
    photos.mkdir()
    copy_photos(photos)
    raw = yaml.safe_load((REPO / "configs/models/perceiver_tiny.yaml").read_text())
    raw["arch_config"] = str(REPO / raw["arch_config"])
    cfg = ensure_clip_weights(from_dict(PerceiverConfig, raw), seed=0, cache=root / "clip")
    return build_tiny_shards(photos, str(root / "shards")), save_perceiver(cfg.build(), cfg, root / "perceiver")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--worker-start-timeout", type=float, default=None,
                        help="ray.worker_start_timeout_s (default: Ray's, 60 s)")
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--plot-to", type=Path, help="copy the run's elastic/world_size.png here")
    args = parser.parse_args()

    import ray
    from mlflow.tracking import MlflowClient
    from ray.cluster_utils import Cluster

    from perceive_ir.config import load_config
    from perceive_ir.orchestration.config import Stage2Config
    from perceive_ir.orchestration.trainer import launch

    root = Path(tempfile.mkdtemp(prefix="bench-elastic-"))
    shards, perceiver = inputs(root)
    workers = 1 if args.gpu else 2
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "_system_config": {
        "health_check_initial_delay_ms": 0, "health_check_period_ms": 500, "health_check_timeout_ms": 500,
        "health_check_failure_threshold": 3}})
    gpus = {"num_gpus": 1} if args.gpu else {}
    nodes = [cluster.add_node(num_cpus=1, resources=SLOT, **gpus) for _ in range(2)]
    storage, tracking = root / "ray", f"sqlite:///{root / 'mlflow.db'}"
    overrides = [
        "name=bench-elastic", f"perceiver={perceiver}", f"data.train.sources=[{{location: {shards}}}]",
        "data.train.patch_size=32", "data.train.batch_size=2", "data.train.samples_per_epoch=16",
        "data.validation.images=2", "data.validation.types=[haze]", "data.validation.patch_size=32",
        "loss.identity=0", f"loop.max_steps={args.steps}", "loop.log_every=1", "loop.checkpoint_every=5",
        f"loop.val_every={args.steps}", f"tracking.uri={tracking}", "tracking.experiment=bench-elastic",
        f"storage.path={storage}", "storage.keep_last=4", "storage.max_failures=4",
        f"ray.address={cluster.address}", f"ray.num_workers=[1, {workers}]", "ray.resize_check_s=2",
        f"ray.resources_per_worker={{CPU: 1, training_slot: 1{', GPU: 1' if args.gpu else ''}}}",
        f"ray.use_gpu={str(args.gpu).lower()}", "ray.health_check_interval_s=0.2", "engine.global_batch=4",
    ]
    if args.worker_start_timeout is not None:
        overrides.append(f"ray.worker_start_timeout_s={args.worker_start_timeout}")
    cfg = load_config(Stage2Config, REPO / "configs/stage2_tiny.yaml", overrides)
    marks: dict[str, float] = {}
    returned: list[subprocess.Popen] = []

    def drill() -> None:
        try:
            wait_for(lambda: any(s["step"] >= 10 for s in checkpoint_states(storage)), "a first checkpoint")
            lost = nodes[1].node_id if not args.gpu else next(
                n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("training_slot"))
            victim = nodes[1] if nodes[1].node_id == lost else nodes[0]
            marks["lost"] = time.time()
            cluster.remove_node(victim)
            wait_for(lambda: not next(n["Alive"] for n in ray.nodes() if n["NodeID"] == lost), "Ray to see the loss")
            marks["detected"] = time.time()
            if args.gpu:
                return
            wait_for(lambda: any(s["world_size"] == 1 for s in checkpoint_states(storage)), "a checkpoint at one worker")
            marks["added"] = time.time()
            returned.append(subprocess.Popen(
                [str(Path(sys.executable).parent / "ray"), "start", "--address", cluster.address, "--block",
                 "--num-cpus", "1", "--resources", json.dumps(SLOT)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        except BaseException as err:  # noqa: BLE001 - reported below
            marks["error"] = err

    threading.Thread(target=drill, daemon=True).start()
    started = time.time()
    try:
        result = launch("stage2", cfg, working_dir=REPO)
    finally:
        ray.shutdown()
        for node in returned:
            node.terminate()
        cluster.shutdown()
    if "error" in marks:
        raise marks["error"]
    client = MlflowClient(tracking_uri=tracking)

    def points(key: str):
        return sorted(client.get_metric_history(result.run_id, key), key=lambda m: m.timestamp)

    sizes, firsts, loads = points("train/world_size"), points("elastic/restart_lost_s"), points("elastic/checkpoint_load_s")

    def launch_after(moment: float):
        launch_point = next(m for m in sizes if m.timestamp / 1000 > moment)
        first = next(m for m in firsts if m.timestamp >= launch_point.timestamp)
        load = next(m.value for m in loads if m.step == launch_point.step)
        return launch_point, first, load

    print(f"{args.steps} steps, {'GPU' if args.gpu else 'CPU'} workers, whole run {time.time() - started:.0f} s")
    size, first, load = launch_after(marks["lost"])
    restart = size.timestamp / 1000 - load - marks["detected"]
    print(f"node loss -> first step at {int(size.value)} worker(s): {first.timestamp / 1000 - marks['lost']:.1f} s = "
          f"detection {marks['detected'] - marks['lost']:.1f} s + restart {restart:.1f} s + checkpoint load "
          f"{load:.2f} s + first step {(first.timestamp - size.timestamp) / 1000:.2f} s")
    if not args.gpu:
        size, first, load = launch_after(marks["added"])
        print(f"node return -> first step at {int(size.value)} workers: {first.timestamp / 1000 - marks['added']:.1f} s"
              f" (node start and resize check, restart, checkpoint load {load:.2f} s)")
    if args.plot_to is not None:
        import shutil

        plot = client.download_artifacts(result.run_id, "elastic/world_size.png", str(root))
        shutil.copy(plot, args.plot_to)
        print(f"world-size plot: {args.plot_to}")


if __name__ == "__main__":
    main()
