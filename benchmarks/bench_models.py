"""Forward+backward time and peak memory per backbone, with and without the quality-aware losses.

    python benchmarks/bench_models.py                 # CPU: batch 2 x 3 x 128 x 128, fp32
    python benchmarks/bench_models.py --device cuda   # GPU: batch 8 x 3 x 256 x 256, bf16 autocast

Backbones are full size. On the CPU the frozen helpers (perceiver CLIP, DINOv2, VGG-16) are the
tiny test configurations (said in the output); on a GPU they are the full-size architectures with
random weights (timing does not depend on the weights). Each row runs in a fresh subprocess so
that peak memory (ru_maxrss growth on the CPU, max_memory_allocated on CUDA) is its own.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FULL_BACKBONES = {
    "restormer": {},
    "nafnet": {},
}
TINY_SEMANTIC = {"model": "vit_small_patch14_dinov2", "pretrained": False, "layers": [0, 1, 2, 3], "image_size": 28,
                 "model_kwargs": {"img_size": 28, "depth": 4, "embed_dim": 32, "num_heads": 2}}
TINY_VGG = {"pretrained": False, "widths": [8, 16, 16, 32, 32]}


def run_row(args: argparse.Namespace, backbone: str, conditioned: bool, losses: bool) -> dict:
    import resource

    import torch

    from perceive_ir.losses import LossConfig
    from perceive_ir.models import MediumTierGenerator, PerceiverConfig, RestorerConfig
    from perceive_ir.models.clip_backend import register_arch_config
    from perceive_ir.components import ComponentSpec

    device = torch.device(args.device)
    tiny = device.type == "cpu"
    torch.manual_seed(0)
    semantic = TINY_SEMANTIC if tiny else {"pretrained": False}
    cond = ComponentSpec("perceive_ir", {"semantic": semantic}) if conditioned else ComponentSpec("none")
    net = RestorerConfig(backbone=ComponentSpec(backbone), conditioning=cond).build().to(device)
    loss_fn = medium = None
    if losses:
        if tiny:
            register_arch_config(REPO / "configs/models/clip_tiny.json")
            pcfg = PerceiverConfig(architecture="clip_tiny", pretrained=None)
        else:
            pcfg = PerceiverConfig(pretrained=None)
        from perceive_ir.models.clip_backend import load_clip
        from perceive_ir.models.perceiver import QualityPerceiver

        clip, identity = load_clip(pcfg.architecture, None, None)
        perceiver = QualityPerceiver(clip, identity, pcfg).to(device).freeze_prompts()
        vgg = TINY_VGG if tiny else {"pretrained": False}
        loss_fn = LossConfig(perceptual=ComponentSpec("difficulty_adaptive_perceptual", {"vgg": vgg})).build(perceiver)
        loss_fn = loss_fn.to(device)
        medium = MediumTierGenerator([RestorerConfig(backbone=ComponentSpec("nafnet", {"width": 16}),
                                                     conditioning=ComponentSpec("none")).build() for _ in range(2)]).to(device)
    b, size = (2, 128) if tiny else (8, 256)
    x = torch.rand(b, 3, size, size, device=device)
    other = torch.rand(b, 3, size, size, device=device)
    y = torch.rand(b, 3, size, size, device=device)
    keys = [f"k{i}" for i in range(b)]
    types = torch.arange(b, device=device) % 2
    dtype = torch.bfloat16 if device.type == "cuda" else None

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            if conditioned:
                prior = net.prior(x)
                out = net(x, prior)
                codes = (prior.code, net.encode_degradation(other), types)
            else:
                out, codes = net(x, None), None
            if loss_fn is None:
                loss = (out - y).abs().mean()
            else:
                loss = loss_fn(out, y, x, medium=medium(x, keys), codes=codes)["total"]
        loss.backward()
        net.zero_grad(set_to_none=True)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up
    sync()
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:  # peak RSS of this fresh process (model, data and activations)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    times.sort()
    return {"ms": 1000 * times[len(times) // 2], "mib": peak, "base_mib": base_rss / 1024}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--row", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("no CUDA device found: run without --device cuda for the CPU table")
            sys.exit(2)
    if args.row:
        backbone, conditioned, losses = args.row.split(",")
        print(json.dumps(run_row(args, backbone, conditioned == "1", losses == "1")))
        return
    shape = "2 x 3 x 128 x 128 fp32" if args.device == "cpu" else "8 x 3 x 256 x 256 bf16"
    note = "tiny perceiver CLIP / DINOv2 / VGG" if args.device == "cpu" else "full-size frozen helpers, random weights"
    memory = "peak RSS MiB" if args.device == "cpu" else "peak alloc MiB"
    print(f"device {args.device}, batch {shape}, full-size backbones, {note}, median of {args.steps} steps")
    print(f"{'backbone':<10} | {'conditioning':<12} | {'losses':<12} | {'fwd+bwd ms':>10} | {memory:>12}")
    for backbone in FULL_BACKBONES:
        for conditioned in (False, True):
            for losses in (False, True):
                cmd = [sys.executable, __file__, "--device", args.device, "--steps", str(args.steps),
                       "--row", f"{backbone},{int(conditioned)},{int(losses)}"]
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode:
                    print(f"{backbone}: failed\n{done.stderr[-2000:]}")
                    continue
                row = json.loads(done.stdout.strip().splitlines()[-1])
                print(f"{backbone:<10} | {'perceive_ir' if conditioned else 'none':<12} | "
                      f"{'L1+cl+clip+dpl' if losses else 'L1 only':<12} | {row['ms']:10.0f} | {row['mib']:12.0f}")


if __name__ == "__main__":
    main()
