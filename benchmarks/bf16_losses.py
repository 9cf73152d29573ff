"""L_dpl and L_clip of the bf16 training path against their fp32 values, on the same inputs.

    python benchmarks/bf16_losses.py                  # CPU, the tiny ETB profile (restormer_etb_tiny.yaml)
    python benchmarks/bf16_losses.py --device cuda    # GPU, the paper's ETB profile (restormer_etb.yaml),
                                                      # VGG-16 and CLIP ViT-B/32

Two copies of the stage-2 model are built alike (same seed): one stays fp32; the other goes through
the training path, ``train.engine.build_engine`` with DeepSpeed in bf16 (where DeepSpeed is not
installed, its cast of every parameter to bf16 is applied by hand, with the same fp32 exceptions).
Printed: the dtypes the engine left to the restorer and to the frozen networks; L_dpl and L_clip on
the same images (values exact in bf16, handed to the fp32 model as fp32 and to the bf16 model as
bf16); then a short stage-2 run of the bf16 engine (forward, backward, step), its first forward's
L_dpl and L_clip next to the fp32 model's losses of that forward's own outputs (restored image and
medium tier, as fp32). The frozen networks are randomly initialised (nothing is downloaded): what is
measured is arithmetic precision, which does not depend on trained weights.
Exit status 1 when a ratio is off by more than ``--tolerance`` (default 1%).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "platform"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from perceive_ir.config import from_dict, load_config  # noqa: E402
from perceive_ir.losses import LossConfig  # noqa: E402
from perceive_ir.models import MediumTierGenerator, PerceiverConfig, RestorerConfig  # noqa: E402
from perceive_ir.train.config import EngineConfig, OptimizerConfig  # noqa: E402
from perceive_ir.train.steps import type_index  # noqa: E402
from perceive_ir.train.tasks import Stage2Task  # noqa: E402

TINY_VGG = {"pretrained": False, "widths": [8, 16, 16, 32, 32], "layers": [3, 8, 15, 22]}
PROFILES = {
    # restorer file, perceiver, VGG
    "tiny": ("configs/models/restormer_etb_tiny.yaml",
             {"architecture": "clip_tiny", "pretrained": None, "arch_config": "configs/models/clip_tiny.json"},
             TINY_VGG),
    "paper": ("configs/models/restormer_etb.yaml", {"architecture": "ViT-B-32", "pretrained": None},
              {"pretrained": False, "layers": [3, 8, 15, 22]}),
}


def restorer_config(path: str) -> RestorerConfig:
    cfg = load_config(RestorerConfig, REPO / path)
    cfg.conditioning.params.setdefault("semantic", {})["pretrained"] = False  # random DINOv2: no download
    return from_dict(RestorerConfig, {"backbone": {"name": cfg.backbone.name, "params": cfg.backbone.params},
                                      "conditioning": {"name": cfg.conditioning.name,
                                                       "params": cfg.conditioning.params}})


def build_task(profile: str, seed: int) -> Stage2Task:
    restorer_file, perceiver, vgg = PROFILES[profile]
    torch.manual_seed(seed)
    restorer_cfg = restorer_config(restorer_file)
    perceiver_cfg = from_dict(PerceiverConfig, {k: (str(REPO / v) if k == "arch_config" else v)
                                                for k, v in perceiver.items()})
    loss = load_config(LossConfig, REPO / "configs/models/loss.yaml")
    loss.perceptual.params["vgg"] = vgg
    loss = from_dict(LossConfig, {"l1": loss.l1, "l2": loss.l2, "l3": loss.l3,
                                  "perceptual": {"name": loss.perceptual.name, "params": loss.perceptual.params}})
    medium = MediumTierGenerator([restorer_cfg.build() for _ in range(2)])
    return Stage2Task(restorer_cfg, loss, perceiver_cfg.build(), medium, OptimizerConfig(), max_steps=100)


def images(batch: int, size: int, device: torch.device, seed: int) -> dict[str, torch.Tensor]:
    """Smooth clean images, their noisy version, a partly restored one and a medium tier, all
    rounded to bf16 values (so both precisions see the very same numbers)."""
    gen = torch.Generator().manual_seed(seed)
    clean = F.interpolate(torch.rand(batch, 3, 8, 8, generator=gen), size=(size, size), mode="bicubic",
                          align_corners=False).clamp(0, 1)
    degraded = (clean + 0.1 * torch.randn(clean.shape, generator=gen)).clamp(0, 1)
    restored = (0.8 * clean + 0.2 * degraded + 0.01 * torch.randn(clean.shape, generator=gen)).clamp(0, 1)
    medium = (0.5 * clean + 0.5 * degraded).clamp(0, 1)
    out = {"clean": clean, "degraded": degraded, "restored": restored, "medium": medium}
    return {k: v.to(torch.bfloat16).float().to(device) for k, v in out.items()}


def bf16_engine(task: Stage2Task, device: torch.device, zero_stage: int):
    """(callable model, module): DeepSpeed's engine in bf16 as training builds it, or the same cast by hand."""
    model = task.model.to(device)
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        from perceive_ir.models.precision import fp32_kept

        with fp32_kept(model):  # what train.engine.build_engine does around DeepSpeed's cast
            for p in model.parameters():
                p.data = p.data.to(torch.bfloat16)
        print("DeepSpeed is not installed: its bf16 cast applied by hand")
        return model, model, None
    from perceive_ir.train.engine import build_engine, deepspeed_settings, init_distributed

    init_distributed(device)
    cfg = EngineConfig(deepspeed_config=str(REPO / "configs/deepspeed/zero1.json"), precision="bf16",
                       zero_stage=zero_stage)
    settings = deepspeed_settings(cfg, micro_batch=2, world_size=1, device=device)
    engine, _ = build_engine(model, task.param_groups(), task.schedule_factors(), OptimizerConfig(), settings)
    return engine, engine.module, engine


def dtypes(named: dict[str, torch.nn.Module]) -> str:
    """The dtypes of each network's parameters (the restorer's: its trained ones)."""
    def kinds(name: str, m: torch.nn.Module) -> list[str]:
        trained = name != "restorer"
        return sorted({str(p.dtype).replace("torch.", "") for p in m.parameters() if p.requires_grad or trained})

    return ", ".join(f"{name} {kinds(name, m)}" for name, m in named.items() if m is not None)


def ratio_line(name: str, fp32: float, bf16: float) -> tuple[str, float]:
    ratio = bf16 / fp32 if fp32 else float("nan")
    return f"{name:>6}: fp32 {fp32:12.6g}   bf16 {bf16:12.6g}   bf16/fp32 {ratio:.5f}", ratio


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--profile", choices=sorted(PROFILES), help="default: tiny on the CPU, paper on a GPU")
    parser.add_argument("--size", type=int, help="crop size (default: 64 tiny, 128 paper)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="bf16 training steps of the short stage-2 run (0: none)")
    parser.add_argument("--zero-stage", type=int, default=1, choices=(0, 1, 2))
    parser.add_argument("--tolerance", type=float, default=0.01)
    args = parser.parse_args()
    device = torch.device(args.device)
    profile = args.profile or ("tiny" if device.type == "cpu" else "paper")
    size = args.size or (64 if profile == "tiny" else 128)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(f"profile {profile} ({PROFILES[profile][0]}), device {device}, batch {args.batch} x {size} px, "
          f"ZeRO {args.zero_stage}")

    reference = build_task(profile, seed=0).model.to(device)
    task = build_task(profile, seed=0)
    run, module, engine = bf16_engine(task, device, args.zero_stage)
    frozen = {"restorer": module.restorer, "VGG": module.loss.perceptual.vgg, "CLIP": task.perceiver.clip,
              "DINOv2": getattr(module.restorer.conditioning, "semantic", None)}
    print("parameter dtypes after engine init:", dtypes(frozen))

    x = images(args.batch, size, device, seed=1)
    failed = False
    with torch.no_grad():
        fp32_dpl = reference.loss.perceptual(x["restored"], x["clean"], [x["degraded"], x["medium"]])
        fp32_clip = reference.loss.quality(x["restored"])
        b = {k: v.to(torch.bfloat16) for k, v in x.items()}
        bf16_dpl = module.loss.perceptual(b["restored"], b["clean"], [b["degraded"], b["medium"]])
        bf16_clip = module.loss.quality(b["restored"])
    print("same inputs:")
    for name, fp32, bf16 in (("L_dpl", fp32_dpl, bf16_dpl), ("L_clip", fp32_clip, bf16_clip)):
        line, ratio = ratio_line(name, float(fp32), float(bf16))
        failed |= not abs(ratio - 1) <= args.tolerance
        print("  " + line)

    ids = [f"image-{i}" for i in range(args.batch)]
    types = type_index((["gaussian_noise", "rain"] * args.batch)[: args.batch], device)
    steps = args.steps
    if steps < 1:
        print("OK" if not failed else f"FAILED: a same-input ratio is off by more than {args.tolerance:.0%}")
        return 1 if failed else 0
    print(f"short stage-2 run ({steps} bf16 steps), the first forward's terms against the fp32 losses of its outputs:")
    started = time.perf_counter()
    for step in range(steps):
        terms, restored = run(b["degraded"], b["clean"], ids, types)
        if step == 0:
            with torch.no_grad():
                medium = module.medium_tier(b["degraded"], ids).float()
                out = restored.detach().float()
                fp32 = {"dpl": reference.loss.perceptual(out, x["clean"], [x["degraded"], medium]),
                        "clip": reference.loss.quality(out)}
            for name, key in (("L_dpl", "dpl"), ("L_clip", "clip")):
                line, ratio = ratio_line(name, float(fp32[key]), float(terms[key].detach()))
                failed |= not abs(ratio - 1) <= args.tolerance
                print("  " + line)
        if engine is not None:
            engine.backward(terms["total"])
            engine.step()
        else:
            terms["total"].backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    print(f"  {steps} steps in {time.perf_counter() - started:.2f} s, last total {float(terms['total'].detach()):.6g}")
    print("parameter dtypes after the steps:", dtypes(frozen))
    with contextlib.suppress(Exception):
        torch.distributed.destroy_process_group()
    print("OK" if not failed else f"FAILED: a same-input ratio is off by more than {args.tolerance:.0%}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
