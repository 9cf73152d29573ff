"""Stage-2 training step: Ray Train + DeepSpeed against a bare PyTorch loop, and 2 workers against 1.

    python benchmarks/bench_train.py [--windows 12] [--steps 5] [--batch 4] [--patch 64]
    python benchmarks/bench_train.py --gpu      # one process on the GPU: batch 8 x 256 x 256, bf16

CPU mode (side by side, one run): the steady-state step of the tiny stage-2 model
(configs/stage2_tiny.yaml, all quality-aware losses) on the same batch of real photo crops,
(a) in a bare PyTorch loop in a plain process (the same fused AdamW and gradient clipping),
(b) under Ray Train with 1 worker and a DeepSpeed engine, (c) under Ray Train with 2 workers;
each process uses one thread. The Ray workers and the bare loop take turns in short windows,
so that the drift of a shared machine touches both sides of each pair alike; the ratios are
medians over the windows, and scaling compares each side with its own baseline. Two bare
loops at once, in the same windows, give the machine's own 2-process ceiling.
Targets: (b)/(a) <= 1.10, samples/s (c)/(b) >= 1.7. GPU mode: images/s with all quality-aware
losses and with L1 alone, and the share of the step spent synthesising degradations.
Figures only: nothing is asserted.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for entry in (REPO / "platform", REPO):
    if str(entry) not in sys.path:
        sys.path.insert(0, str(entry))


def build(batch: int, patch: int, device, losses: str = "full", dtype=None):
    """The tiny (or given) stage-2 task and one degraded batch of real photo crops on ``device``."""
    import os
    import tempfile

    import numpy as np
    import torch
    import yaml

    from perceive_ir.config import from_dict, load_config
    from perceive_ir.degrade import DegradationConfig, Degrader
    from perceive_ir.models import MediumTierGenerator, PerceiverConfig
    from perceive_ir.orchestration.config import Stage2Config
    from perceive_ir.products import ensure_clip_weights
    from perceive_ir.train.steps import DegradedBatch, synthesize
    from perceive_ir.train.tasks import Stage2Task

    os.chdir(REPO)
    torch.manual_seed(0)
    # "full": every stage-2 term, L_dpl included (the tiny profile itself leaves it off)
    overrides = ["perceiver=unused"] + (["loss.l1=0", "loss.l2=0", "loss.l3=0"] if losses == "l1" else ["loss.l3=0.1"])
    cfg = load_config(Stage2Config, REPO / "configs/stage2_tiny.yaml", overrides)
    perceiver_cfg = ensure_clip_weights(
        from_dict(PerceiverConfig, yaml.safe_load((REPO / "configs/models/perceiver_tiny.yaml").read_text())),
        seed=0, cache=Path(tempfile.gettempdir()) / "perceive_ir_bench")
    medium = MediumTierGenerator([cfg.restorer.build().backbone for _ in range(2)])
    task = Stage2Task(cfg.restorer, cfg.loss, perceiver_cfg.build(), medium, cfg.optimizer, 10_000)
    from skimage import data

    images = [np.asarray(getattr(data, n)())[..., :3] for n in ("astronaut", "coffee", "chelsea", "rocket")]
    crops = []
    for i in range(batch):
        image = images[i % len(images)]
        y, x = (17 * i) % (image.shape[0] - patch), (29 * i) % (image.shape[1] - patch)
        crops.append(torch.from_numpy(image[y : y + patch, x : x + patch].copy()).permute(2, 0, 1))
    gt = torch.stack(crops).float() / 255
    raw = {"gt": gt, "lq": gt, "paired": torch.zeros(batch, dtype=torch.bool), "type": ["clean"] * batch,
           "key": [f"bench/{i}" for i in range(batch)]}
    degrader = Degrader(DegradationConfig(mixture={"gaussian_noise": 1, "gaussian_blur": 1, "rain": 1, "haze": 1}))
    degraded: DegradedBatch = synthesize(degrader, raw, 0, device, dtype or torch.float32)
    return task, degraded, (degrader, raw)


class BareLoop:
    """The baseline: the same model, batch, fused AdamW and gradient clipping, no Ray, no DeepSpeed."""

    def __init__(self, batch: int, patch: int) -> None:
        import torch

        from perceive_ir.train.config import OptimizerConfig
        from perceive_ir.train.engine import make_optimizer

        torch.set_num_threads(1)
        self.task, self.batch, _ = build(batch, patch, torch.device("cpu"))
        self.optimizer = make_optimizer(self.task.param_groups(), OptimizerConfig(lr=1e-4))
        self.params = self.task.param_groups()[0]["params"]
        self.run(3)  # warm-up

    def run(self, steps: int) -> list[float]:
        import torch

        b, times = self.batch, []
        for _ in range(steps):
            start = time.perf_counter()
            terms, _ = self.task.model(b.degraded, b.clean, b.clean_ids, b.type_index)
            self.optimizer.zero_grad(set_to_none=True)
            terms["total"].backward()
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.optimizer.step()
            times.append(time.perf_counter() - start)
        return times


class Baton:
    """Turns between processes through files in one folder: a participant waits for
    ``<who>-go-<n>``, runs its n-th window of steps and writes its median step time into
    ``<who>-done-<n>``; the driver starts participants and waits for them."""

    def __init__(self, folder: Path, alive: dict | None = None) -> None:
        self.folder, self.turns, self.alive = folder, {}, alive or {}

    def wait_for(self, path: Path, who: str | None = None) -> None:
        """Wait for a file; fail, instead of hanging, once ``who`` has stopped without writing it."""
        alive = self.alive.get(who, lambda: True)
        while not path.exists():
            if not alive() and not path.exists():
                raise RuntimeError(f"benchmark participant '{who}' stopped before writing '{path.name}': see the log above")
            time.sleep(0.01)

    def take(self, who: str, turn: int) -> None:
        self.wait_for(self.folder / f"{who}-go-{turn}")

    def hand_back(self, who: str, turn: int, median_s: float) -> None:
        (self.folder / f"{who}-done-{turn}.tmp").write_text(repr(median_s))
        (self.folder / f"{who}-done-{turn}.tmp").rename(self.folder / f"{who}-done-{turn}")

    def run(self, *who: str) -> list[float]:
        """Start the next window of each participant at once; their median step times."""
        turns = [self.turns.get(w, 0) for w in who]
        for w, turn in zip(who, turns):
            (self.folder / f"{w}-go-{turn}").touch()
        medians = []
        for w, turn in zip(who, turns):
            self.wait_for(self.folder / f"{w}-done-{turn}", w)
            medians.append(float((self.folder / f"{w}-done-{turn}").read_text()))
            self.turns[w] = turn + 1
        return medians


def bare_process(config: dict, who: str, windows: int) -> None:
    """The bare loop in a plain process of its own, one window at a time."""
    bare, baton = BareLoop(config["batch"], config["patch"]), Baton(Path(config["baton"]))
    (baton.folder / f"ready-{who}").touch()
    for turn in range(windows):
        baton.take(who, turn)
        baton.hand_back(who, turn, statistics.median(bare.run(config["steps"])))


def ray_worker(config: dict) -> None:
    """Steps of the DeepSpeed engine under Ray Train, one window at a time."""
    import ray.train
    import torch

    from perceive_ir.train.config import EngineConfig, OptimizerConfig
    from perceive_ir.train.engine import build_engine, deepspeed_settings, init_distributed

    torch.set_num_threads(1)
    device = torch.device("cpu")
    init_distributed(device)
    context = ray.train.get_context()
    world, rank = context.get_world_size(), context.get_world_rank()
    task, b, _ = build(config["batch"], config["patch"], device)
    settings = deepspeed_settings(EngineConfig(deepspeed_config=str(REPO / "configs/deepspeed/zero1.json")),
                                  config["batch"], world, device)
    engine, _ = build_engine(task.model, task.param_groups(), task.schedule_factors(), OptimizerConfig(lr=1e-4), settings)
    baton, step = Baton(Path(config["baton"])), 0
    (baton.folder / f"ready-ray{rank}").touch()
    for turn in range(config["windows"] + 1):
        baton.take("ray", turn)
        times = []
        for _ in range(config["steps"]):
            start = time.perf_counter()  # no barrier: the training loop has none either
            terms = task.compute(engine, b, step)
            engine.backward(terms["total"])
            engine.step()
            times.append(time.perf_counter() - start)
            step += 1
        torch.distributed.barrier()  # every rank is done before the driver hands the CPU on
        if rank == 0:
            baton.hand_back("ray", turn, statistics.median(times))


def wait_until_quiet(limit_s: float = 90.0, busy_percent: float = 10.0) -> None:
    """Begin on an idle machine: for a while after ``ray.init`` and after a worker group starts,
    Ray starts idle worker processes, and they would be timed as part of the measurement."""
    import psutil

    deadline = time.monotonic() + limit_s
    while psutil.cpu_percent(interval=2.0) > busy_percent and time.monotonic() < deadline:
        pass


def interleaved(workers: int, args) -> dict[str, list[float]]:
    """Per window, the median step of the Ray Train + DeepSpeed workers, then of one bare loop
    and (with 2 workers) of two bare loops at once: a drift of the machine touches all alike."""
    import multiprocessing
    import tempfile
    import threading

    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    folder = Path(tempfile.mkdtemp(prefix="bench-baton-"))
    config = {"steps": args.steps, "windows": args.windows, "batch": args.batch, "patch": args.patch,
              "baton": str(folder)}
    spawn = multiprocessing.get_context("spawn")
    bare_names = ["a", "b"][:workers]
    turns_of = {"a": (args.windows + 1) * workers, "b": args.windows + 1}  # "a" also runs beside "b"
    bares = [spawn.Process(target=bare_process, args=(config, who, turns_of[who]), daemon=True) for who in bare_names]
    for process in bares:
        process.start()
    trainer = TorchTrainer(ray_worker, train_loop_config=config,
                           scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 1}),
                           run_config=RunConfig(storage_path=tempfile.mkdtemp(prefix="bench-ray-")))
    fit = threading.Thread(target=trainer.fit, daemon=True)
    fit.start()
    baton = Baton(folder, alive={"ray": fit.is_alive, **{w: p.is_alive for w, p in zip(bare_names, bares)}})
    for name in bare_names:
        baton.wait_for(folder / f"ready-{name}", name)
    for rank in range(workers):
        baton.wait_for(folder / f"ready-ray{rank}", "ray")
    wait_until_quiet()  # Ray refills its pool of idle worker processes after starting the group
    figures: dict[str, list[float]] = {"ray": [], "bare": [], "bare_pair": []}
    for window in range(args.windows + 1):  # window 0 warms up
        ray, = baton.run("ray")
        bare, = baton.run("a")
        pair = sum(baton.run("a", "b")) / 2 if workers == 2 else float("nan")
        if window:
            for key, value in zip(figures, (ray, bare, pair)):
                figures[key].append(value)
        print(f"  {workers} worker(s), window {window}/{args.windows}", end="\r", flush=True)
    fit.join()
    for process in bares:
        process.join()
    return figures


def cpu_mode(args) -> None:
    from perceive_ir.orchestration.config import RaySettings
    from perceive_ir.orchestration.ray_runtime import connect

    median = statistics.median
    connect(RaySettings(num_workers=2), REPO)  # default health checks: a tight interval costs CPU
    one, two = interleaved(1, args), interleaved(2, args)
    relative_one = [r / b for r, b in zip(one["ray"], one["bare"])]
    relative_two = [r / b for r, b in zip(two["ray"], two["bare"])]
    overhead = median(relative_one)
    scaling = 2 * overhead / median(relative_two)  # samples/s 2 t1 / t2, each against its own baseline
    ceiling = median(2 * b / p for b, p in zip(two["bare"], two["bare_pair"]))
    ms = lambda times: f"{median(times) * 1e3:.1f}"  # noqa: E731
    print(f"\nstage-2 step, tiny model, batch {args.batch} x {args.patch} x {args.patch} per worker, 1 thread per "
          f"process; {args.windows} windows of {args.steps} steps, taking turns; configs/deepspeed/zero1.json "
          f"(a single fp32 worker runs it as stage 0)")
    print(f"{'median step ms':<34} {'Ray + DeepSpeed':>16} {'1 bare loop':>12} {'2 bare loops':>13}")
    print(f"{'1 worker windows':<34} {ms(one['ray']):>16} {ms(one['bare']):>12} {'':>13}")
    print(f"{'2 worker windows':<34} {ms(two['ray']):>16} {ms(two['bare']):>12} {ms(two['bare_pair']):>13}")
    print(f"overhead 1 worker / bare loop: {overhead:.2f}x (target <= 1.10; windows "
          f"{min(relative_one):.2f}..{max(relative_one):.2f})")
    print(f"scaling 2 workers / 1 worker, samples/s: {scaling:.2f}x (target >= 1.7)")
    print(f"this machine meanwhile: 2 bare loops at once / 1, samples/s: {ceiling:.2f}x (the ceiling of the above)")


def gpu_mode(args) -> None:
    import torch

    from perceive_ir.train.config import EngineConfig, OptimizerConfig
    from perceive_ir.train.engine import build_engine, deepspeed_settings, init_distributed
    from perceive_ir.train.steps import synthesize

    if not torch.cuda.is_available():
        raise SystemExit("--gpu needs a CUDA device")
    device = torch.device("cuda")
    init_distributed(device)
    print(f"stage-2 on {torch.cuda.get_device_name()}: batch 8 x 256 x 256, bf16, median of {args.steps} steps")
    for losses in ("full", "l1"):
        task, b, (degrader, raw) = build(8, 256, device, losses, torch.bfloat16)
        settings = deepspeed_settings(EngineConfig(deepspeed_config=str(REPO / "configs/deepspeed/zero1.json"),
                                                   precision="bf16"), 8, 1, device)
        engine, _ = build_engine(task.model, task.param_groups(), task.schedule_factors(), OptimizerConfig(), settings)
        steps, synth = [], []
        for i in range(args.steps + 5):
            torch.cuda.synchronize()
            start = time.perf_counter()
            b = synthesize(degrader, raw, i, device, torch.bfloat16)
            torch.cuda.synchronize()
            mid = time.perf_counter()
            terms = task.compute(engine, b, i)
            engine.backward(terms["total"])
            engine.step()
            torch.cuda.synchronize()
            if i >= 5:
                steps.append(time.perf_counter() - start)
                synth.append(mid - start)
        step = statistics.median(steps)
        print(f"{'quality-aware losses' if losses == 'full' else 'L1 alone':<22} {8 / step:>8.1f} images/s  "
              f"degradation synthesis {100 * statistics.median(synth) / step:.1f}% of the step")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=12, help="CPU mode: turns of Ray and the bare loop")
    parser.add_argument("--steps", type=int, help="steps per window (CPU, default 5) or timed steps (GPU, default 20)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--patch", type=int, default=64)
    parser.add_argument("--gpu", action="store_true")
    args = parser.parse_args()
    args.steps = args.steps or (20 if args.gpu else 5)
    gpu_mode(args) if args.gpu else cpu_mode(args)


if __name__ == "__main__":
    main()
