"""Print the parameter counts of the full-size model configurations.

    python jobs/param_counts.py [--config configs/models/restormer_perceive_ir.yaml ...]

Trainable = what the optimiser updates (backbone + CFE + PGM + PGCA). Frozen = DINOv2 (semantic
guidance); the perceiver's CLIP and the perceptual loss's VGG-16 live outside the restorer and are
listed apart. The published 42 M of Perceive-IR is compared with the trainable count of the two
Restormer networks: hook-attached conditioning (``perceive_ir``) and the paper's ETB network
(``perceive_ir_etb``). Models are built on the ``meta`` device: shapes only, no memory, no weights.
"""

from __future__ import annotations

import argparse
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIGS = ["restormer_perceive_ir.yaml", "restormer_etb.yaml", "nafnet_perceive_ir.yaml"]
PERCEIVE_IR = ("perceive_ir", "perceive_ir_etb")  # conditionings with a frozen DINOv2


def _count(module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in module.parameters()) - trainable


def main(argv: list[str] | None = None) -> None:
    import torch

    from perceive_ir.config import load_config
    from perceive_ir.models import RestorerConfig, VGGConfig, VGGFeatures
    from perceive_ir.components import ComponentSpec

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", nargs="*", default=[str(REPO / "configs/models" / c) for c in DEFAULT_CONFIGS])
    args = parser.parse_args(argv)
    rows = []
    for path in args.config:
        cfg = load_config(RestorerConfig, path)
        if cfg.conditioning.name in PERCEIVE_IR:  # counts only: frozen parts built without weights
            params = dict(cfg.conditioning.params)
            params["semantic"] = {**params.get("semantic", {}), "pretrained": False}
            cfg.conditioning = ComponentSpec(cfg.conditioning.name, params)
        for conditioned in (False, True):
            spec = cfg.conditioning if conditioned else ComponentSpec("none")
            with torch.device("meta"):
                net = RestorerConfig(backbone=cfg.backbone, conditioning=spec).build()
            trainable, frozen = _count(net)
            rows.append((cfg.backbone.name, spec.name, trainable, frozen))
    print(f"{'backbone':<10} | {'conditioning':<15} | {'trainable M':>11} | {'frozen M':>8} | vs 42 M")
    for backbone, cond, trainable, frozen in rows:
        delta = f"{(trainable - 42e6) / 42e6:+.1%}" if backbone == "restormer" and cond in PERCEIVE_IR else ""
        print(f"{backbone:<10} | {cond:<15} | {trainable / 1e6:11.2f} | {frozen / 1e6:8.2f} | {delta}")
    with torch.device("meta"):
        vgg = VGGFeatures(VGGConfig(pretrained=False))
    print(f"frozen outside the restorer: VGG-16 features to relu4_3 {_count(vgg)[1] / 1e6:.2f} M (perceptual loss); "
          "CLIP ViT-B/32 about 151 M (perceiver)")


if __name__ == "__main__":
    main()
