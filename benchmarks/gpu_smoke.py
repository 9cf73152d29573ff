"""A short stage-1 + stage-2 run on one device, through the jobs' own code without Ray.

    python benchmarks/gpu_smoke.py --device cuda --steps 50     # bf16, every loss, the medium tier
    python benchmarks/gpu_smoke.py --device cpu --steps 2       # the same path on the CPU (dry run)

Shards are built from the photos that ship inside packages; stage 1 (fold restorers, then
prompts) and stage 2 (the tiny conditioned restorer, L_rec + L_cl + L_clip + L_dpl with the
medium tier's hard negatives) each run ``--steps`` steps under a DeepSpeed engine, with the
stage-1 products handed to stage 2 as the jobs hand them. Prints steps/s per stage and the
last logged loss terms; exits non-zero if a loss is not finite or a product is missing.
"""

from __future__ import annotations

import argparse
import math
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for entry in (REPO / "platform", REPO):
    if str(entry) not in sys.path:
        sys.path.insert(0, str(entry))


class LastMetrics:
    """A tracker that keeps the latest value of each metric and the logged product folders."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.metrics = folder, {}

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.metrics.update(metrics)

    def log_file(self, path, artifact_path=None) -> None:
        pass

    def log_folder(self, path, artifact_path) -> None:
        import shutil

        shutil.copytree(path, self.folder / artifact_path, dirs_exist_ok=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_stage(stage: str, overrides: list[str], device, work: Path) -> tuple[LastMetrics, float]:
    from perceive_ir.config import load_config
    from perceive_ir.orchestration.config import Stage1Config, Stage2Config
    from perceive_ir.orchestration.worker import build_task, training_settings
    from perceive_ir.train.loop import LocalReporter, run_training

    cls = Stage1Config if stage == "stage1" else Stage2Config
    cfg = load_config(cls, REPO / f"configs/{stage}_tiny.yaml", overrides)
    task = build_task(stage, cfg, None, work / "cache")
    tracker = LastMetrics(work / stage)
    start = time.perf_counter()
    state = run_training(task, training_settings(cfg), LocalReporter(work / f"checkpoints-{stage}"), tracker,
                         0, 1, device)
    return tracker, state.step / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    parser.add_argument("--steps", type=int, default=50, help="steps of each stage")
    parser.add_argument("--patch", type=int, default=None, help="crop size (default: 128 on a GPU, 48 on the CPU)")
    args = parser.parse_args()

    import torch

    from dataset_tools.build import BuildConfig, build_shards
    from dataset_tools.sources import SourceSpec
    from perceive_ir.data.package_photos import copy_photos
    from perceive_ir.train.engine import init_distributed

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"no CUDA device: torch {torch.__version__} reports torch.cuda.is_available() == False")
        return 1
    gpu = device.type == "cuda"
    patch = args.patch or (128 if gpu else 48)
    os.chdir(REPO)  # the tiny profiles name model files relative to the repository
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    init_distributed(device)
    where = torch.cuda.get_device_name(device) if gpu else "CPU"
    precision = "bf16" if gpu else "fp32"
    print(f"smoke run on {where}: {args.steps} steps per stage, batch 8 x {patch} x {patch}, {precision}")

    with tempfile.TemporaryDirectory(prefix="gpu-smoke-") as folder:
        work = Path(folder)
        copy_photos(work / "photos")
        build_shards(BuildConfig(output=str(work / "shards"), sources=[SourceSpec("pkg", str(work / "photos"))],
                                 max_side=256, max_samples_per_shard=4, progress=False))
        common = [f"data.train.sources=[{{location: {work / 'shards'}}}]", f"data.train.patch_size={patch}",
                  "data.train.batch_size=8", "data.train.samples_per_epoch=64", f"engine.precision={precision}",
                  f"data.validation.patch_size={patch}", "data.validation.images=4",
                  f"loop.val_every={args.steps}", f"loop.checkpoint_every={args.steps}", "loop.log_every=1"]
        half = max(1, args.steps // 2)
        stage1, rate1 = run_stage("stage1", common + [f"restorer_steps={half}", f"prompt_steps={args.steps - half}"],
                                  device, work)
        products = work / "stage1"
        stage2_overrides = common + [f"loop.max_steps={args.steps}", f"perceiver={products / 'perceiver'}",
                                     f"medium_tier={products / 'medium_tier'}", "loss.l3=0.1"]  # L_dpl too
        stage2, rate2 = run_stage("stage2", stage2_overrides, device, work)
        failures = []
        for name, tracker, rate in (("stage 1", stage1, rate1), ("stage 2", stage2, rate2)):
            terms = {k: v for k, v in tracker.metrics.items() if k.startswith(("train/", "val/mean/"))}
            shown = ", ".join(f"{k}={v:.4g}" for k, v in sorted(terms.items()))
            print(f"{name}: {rate:.2f} steps/s; last: {shown}")
            failures += [f"{name}: {k} = {v}" for k, v in terms.items() if not math.isfinite(v)]
        if not (work / "stage2/restorer/model.safetensors").is_file():
            failures.append("stage 2 wrote no restorer")
        if gpu:
            print(f"peak GPU memory: {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB")
    for failure in failures:
        print(f"FAILED: {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
