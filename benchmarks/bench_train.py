"""Stage-2 training step: Ray Train + DeepSpeed against a bare PyTorch loop, and 2 workers against 1.

    python benchmarks/bench_train.py [--steps 20] [--batch 4] [--patch 64]
    python benchmarks/bench_train.py --gpu      # one process on the GPU: batch 8 x 256 x 256, bf16

CPU mode (side by side, one run): the steady-state step of the tiny stage-2 model
(configs/stage2_tiny.yaml, all quality-aware losses) on the same batch of real photo crops,
(a) in a bare PyTorch loop (AdamW), (b) under Ray Train with 1 worker and a DeepSpeed engine,
(c) under Ray Train with 2 workers; each process uses one thread. Targets: (b)/(a) <= 1.10,
samples/s (c)/(b) >= 1.7. GPU mode: images/s with all quality-aware losses and with L1 alone,
and the share of the step spent synthesising degradations. Figures only: nothing is asserted.
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
    from perceive_ir.train.products import ensure_clip_weights
    from perceive_ir.train.steps import DegradedBatch, synthesize
    from perceive_ir.train.tasks import Stage2Task

    os.chdir(REPO)
    torch.manual_seed(0)
    overrides = ["perceiver=unused"] + (["loss.l1=0", "loss.l2=0", "loss.l3=0"] if losses == "l1" else [])
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


def bare_loop(steps: int, batch: int, patch: int) -> float:
    import torch

    torch.set_num_threads(1)
    task, b, _ = build(batch, patch, torch.device("cpu"))
    model = task.model
    optimizer = torch.optim.AdamW(task.param_groups(), lr=1e-4)
    times = []
    for i in range(steps + 3):
        start = time.perf_counter()
        terms, _ = model(b.degraded, b.clean, b.keys, b.type_index)
        optimizer.zero_grad(set_to_none=True)
        terms["total"].backward()
        torch.nn.utils.clip_grad_norm_(task.param_groups()[0]["params"], 1.0)
        optimizer.step()
        if i >= 3:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def ray_worker(config: dict) -> None:
    import ray.train
    import torch

    from perceive_ir.train.config import EngineConfig, OptimizerConfig
    from perceive_ir.train.engine import build_engine, deepspeed_settings, init_distributed

    torch.set_num_threads(1)
    device = torch.device("cpu")
    init_distributed(device)
    world = ray.train.get_context().get_world_size()
    task, b, _ = build(config["batch"], config["patch"], device)
    settings = deepspeed_settings(EngineConfig(deepspeed_config=str(REPO / "configs/deepspeed/zero1.json")),
                                  config["batch"], world, device)
    engine, _ = build_engine(task.model, task.param_groups(), task.schedule_factors(), OptimizerConfig(lr=1e-4), settings)
    times = []
    for i in range(config["steps"] + 3):
        torch.distributed.barrier()
        start = time.perf_counter()
        terms = task.compute(engine, b, i)
        engine.backward(terms["total"])
        engine.step()
        if i >= 3:
            times.append(time.perf_counter() - start)
    import tempfile

    with tempfile.TemporaryDirectory() as folder:  # Ray Train keeps the metrics of checkpointed reports
        Path(folder, "step_s.txt").write_text(str(statistics.median(times)))
        ray.train.report({"step_s": statistics.median(times)}, checkpoint=ray.train.Checkpoint.from_directory(folder))


def ray_run(workers: int, steps: int, batch: int, patch: int) -> float:
    import tempfile

    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(ray_worker, train_loop_config={"steps": steps, "batch": batch, "patch": patch},
                           scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 1}),
                           run_config=RunConfig(storage_path=tempfile.mkdtemp(prefix="bench-ray-")))
    return float(trainer.fit().metrics["step_s"])


def cpu_mode(args) -> None:
    from perceive_ir.orchestration.config import RaySettings
    from perceive_ir.orchestration.trainer import connect

    bare = bare_loop(args.steps, args.batch, args.patch)
    connect(RaySettings(num_workers=2), REPO)  # default health checks: a tight interval costs CPU
    one = ray_run(1, args.steps, args.batch, args.patch)
    two = ray_run(2, args.steps, args.batch, args.patch)
    rate = lambda workers, step: workers * args.batch / step  # noqa: E731
    print(f"\nstage-2 step, tiny model, batch {args.batch} x {args.patch} x {args.patch} per worker, "
          f"1 thread per process, median of {args.steps} steps")
    print(f"{'setting':<38} {'step ms':>8} {'samples/s':>10}")
    print(f"{'bare PyTorch loop (AdamW)':<38} {bare * 1e3:>8.1f} {rate(1, bare):>10.1f}")
    print(f"{'Ray Train + DeepSpeed, 1 worker':<38} {one * 1e3:>8.1f} {rate(1, one):>10.1f}")
    print(f"{'Ray Train + DeepSpeed, 2 workers':<38} {two * 1e3:>8.1f} {rate(2, two):>10.1f}")
    print(f"overhead 1 worker / bare: {one / bare:.2f}x (target <= 1.10)")
    print(f"scaling 2 workers / 1 (samples/s): {rate(2, two) / rate(1, one):.2f}x (target >= 1.7)")


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
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--patch", type=int, default=64)
    parser.add_argument("--gpu", action="store_true")
    args = parser.parse_args()
    gpu_mode(args) if args.gpu else cpu_mode(args)


if __name__ == "__main__":
    main()
