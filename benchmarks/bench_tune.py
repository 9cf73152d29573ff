"""Ray Tune search overhead and ASHA's savings, on the tiny stage 2 (1 CPU worker per trial):

1. one trial inside Tune (Tune's fit) against the same stage-2 run launched alone (same steps, same
   Ray), wall time; and the whole one-trial search (parent run, results table, plot) against it;
2. the trial-steps a 4-trial search trains under ASHA against FIFO (learning rates 3e-3 .. 1.0);
3. ``--node-loss``: on a 5-node Ray cluster on this machine (tests/_tune_cluster.py), the time from the
   loss of the node running a trial's function to that trial's first resumed step (Tune restarts it,
   its run resumes from its checkpoint), against the same trial's first launch to its first step; the
   tracking store away for the first ``--store-away`` seconds after the loss (0: up throughout).

    python benchmarks/bench_tune.py [--steps 600] [--val-every 200] [--search-steps 30] [--overhead-only]
    python benchmarks/bench_tune.py --node-loss [--store-away 10]

Tune adds a roughly fixed cost per trial (its trial actor, a process that imports the platform, then
the trial's own Train run), so the ratio in 1. depends on the trial's length: the default, 600 steps,
is the length of the tiny stage-2 run (configs/stage2_tiny.yaml); ``--steps 30 --val-every 10`` shows
the cost of a very short trial. The searches of 2. are short (``--search-steps``): they count steps.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "platform"), str(REPO), str(REPO / "tests")]

from perceive_ir.config import from_dict  # noqa: E402
from perceive_ir.search.config import plan_search  # noqa: E402


def products(root: Path) -> tuple[str, Path]:
    from _train_fixtures import build_tiny_shards
    from perceive_ir.data.package_photos import copy_photos
    from perceive_ir.models import PerceiverConfig
    from perceive_ir.products import ensure_clip_weights, save_perceiver

    photos = root / "photos"
    photos.mkdir()
    copy_photos(photos)
    shards = build_tiny_shards(photos, str(root / "shards"))
    raw = yaml.safe_load((REPO / "configs/models/perceiver_tiny.yaml").read_text())
    raw["arch_config"] = str(REPO / raw["arch_config"])
    cfg = ensure_clip_weights(from_dict(PerceiverConfig, raw), seed=0, cache=root / "clip")
    return shards, save_perceiver(cfg.build(), cfg, root / "perceiver")


def search_file(root: Path, name: str, stage2: dict, space: dict, scheduler: str, val_every: int) -> Path:
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "name": name, "base": "configs/stage2_tiny.yaml", "stage2": stage2, "space": space, "num_trials": 1,
        "concurrency": 2, "scheduler": {"name": scheduler, "grace_period": val_every, "reduction_factor": 2},
        "state_save_period_s": 5}))
    return path


def trained_steps(result) -> int:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=result.tracking_uri)
    experiment = client.get_run(result.parent_run_id).info.experiment_id
    runs = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{result.parent_run_id}'")
    return sum(max((m.step for m in client.get_metric_history(r.info.run_id, "train/total")), default=0)
               for r in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600, help="length of the trial timed in 1.")
    parser.add_argument("--val-every", type=int, default=200)
    parser.add_argument("--search-steps", type=int, default=30, help="trial length of the searches in 2.")
    parser.add_argument("--search-val-every", type=int, default=10)
    parser.add_argument("--overhead-only", action="store_true", help="skip the 4-trial ASHA/FIFO searches")
    parser.add_argument("--node-loss", action="store_true", help="only 3.: a trial's node lost on a local cluster")
    parser.add_argument("--store-away", type=float, default=10.0, help="seconds the store is away in 3. (0: up)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import os

    os.chdir(REPO)
    if args.node_loss:
        node_loss(args.store_away)
        return
    from perceive_ir.orchestration.ray_runtime import connect, launch
    from perceive_ir.search.runner import run_search

    root = Path(tempfile.mkdtemp(prefix="bench_tune-"))
    shards, perceiver = products(root)
    stage2 = {
        "perceiver": str(perceiver),
        "data": {"train": {"sources": [{"location": shards}], "patch_size": 32},
                 "validation": {"images": 2, "patch_size": 32, "types": ["gaussian_noise", "haze"]}},
        "loop": {"max_steps": args.steps, "val_every": args.val_every, "log_every": args.val_every},
        "loss": {"l3": 0.1},  # every stage-2 term (the tiny profile leaves L_dpl off), as the figures of docs/search.md
        "optimizer": {"warmup_steps": 0}, "ray": {"num_workers": 1, "health_check_interval_s": 0.1},
        "storage": {"path": str(root / "ray")},
        "tracking": {"uri": f"sqlite:///{root / 'mlflow.db'}", "experiment": "bench-tune"},
    }
    one = plan_search(search_file(root, "one-trial", stage2, {"loss.l1": {"choice": [0.1]}}, "fifo", args.val_every))
    alone_cfg = one.trial_config({"loss.l1": 0.1}, "alone", str(root / "ray"))  # the trial's very config
    warmup = one.trial_config({"loss.l1": 0.1}, "warmup", str(root / "ray"))  # caches and compiled ops
    warmup.loop.max_steps = warmup.loop.val_every = warmup.loop.checkpoint_every = 2
    connect(alone_cfg.ray, REPO)
    launch("stage2", warmup, REPO)
    start = time.perf_counter()
    launch("stage2", alone_cfg, REPO)
    alone = time.perf_counter() - start
    start = time.perf_counter()
    search = run_search(one, REPO)
    whole = time.perf_counter() - start
    print(f"stage-2 run of {args.steps} steps alone: {alone:.1f} s; as one Tune trial: {search.fit_s:.1f} s "
          f"(ratio {search.fit_s / alone:.2f}x, target <= 1.15x); the whole one-trial search, with its "
          f"parent run, results table and plot: {whole:.1f} s ({whole / alone:.2f}x)")
    if args.overhead_only:
        return

    space = {"optimizer.lr": {"grid": [3.0e-3, 1.0e-3, 1.0, 0.5]}}
    short = {**stage2, "loop": {"max_steps": args.search_steps, "val_every": args.search_val_every,
                                "log_every": args.search_val_every}}
    figures = {}
    for scheduler in ("fifo", "asha"):
        plan = plan_search(search_file(root, f"four-{scheduler}", short, space, scheduler, args.search_val_every))
        start = time.perf_counter()
        result = run_search(plan, REPO)
        figures[scheduler] = (trained_steps(result), time.perf_counter() - start,
                              sum(r.status == "early-stopped" for r in result.records))
    (fifo_steps, fifo_s, _), (asha_steps, asha_s, stopped) = figures["fifo"], figures["asha"]
    print(f"4 trials x {args.search_steps} steps, 2 at a time: FIFO trained {fifo_steps} trial-steps in "
          f"{fifo_s:.1f} s; ASHA {asha_steps} in {asha_s:.1f} s ({stopped} stopped early; "
          f"{fifo_steps - asha_steps} trial-steps saved, {1 - asha_steps / fifo_steps:.0%})")


def node_loss(store_away_s: float) -> None:
    """One drill per process (a second local cluster in the same driver process is not supported by Ray)."""
    from _tune_cluster import node_loss_drill, resumed_runs
    from perceive_ir.data.package_photos import copy_photos

    root = Path(tempfile.mkdtemp(prefix="bench_tune-node-"))
    photos = root / "photos"
    photos.mkdir()
    copy_photos(photos)
    drill = node_loss_drill(root, photos, store_away_s)
    try:
        if "error" in drill.seen:
            raise RuntimeError(f"the drill failed: {drill.seen['error']}")
        resumed = resumed_runs(drill)
        if not resumed:
            raise RuntimeError(f"no trial was restarted; the lost node held {drill.seen['killed_actors']}")
        for name, run in resumed.items():
            print(f"trial {name}, store away {store_away_s:g} s after the loss: node lost -> first resumed step "
                  f"{run['loss_to_resumed_s']:.1f} s (resumed from its checkpoint at step {run['resumed_from']}); "
                  f"its first launch -> first step {run['start_to_first_step_s']:.1f} s "
                  f"(ratio {run['loss_to_resumed_s'] / run['start_to_first_step_s']:.2f}x)")
    finally:
        drill.server.stop()

if __name__ == "__main__":
    main()
