"""How far a restorer moves inputs that need little or no restoration (figures only).

    python benchmarks/restorer_floor.py MODEL [--tracking-uri URI] [--images 3]

MODEL as ``jobs/evaluate.py`` takes it (``models:/quickstart-restorer/1``, ``runs:/<id>/restorer``, a
folder). For clean CBSD68 images and light/heavy Gaussian blur and light haze (the evaluation's seeded
degradations, 8-bit rounded) it prints the input's and the output's PSNR, the PSNR of the output
against its input and the RMS of that residual, whole and after a 5 x 5 binomial low-pass: a
restorer that changes a clean image returns every nearly clean input at most that close to its input.
Needs ../shared/datasets/CBSD68.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "platform"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from perceive_ir.degrade import DegradationConfig, Degrader, Spec  # noqa: E402
from perceive_ir.eval.inference import FullImageRestorer, InferenceConfig  # noqa: E402
from perceive_ir.eval.metrics import psnr  # noqa: E402
from perceive_ir.eval.scoring import read_image, to_tensor  # noqa: E402
from perceive_ir.products import load_restorer, resolve_product  # noqa: E402

CASES = [("clean", None), ("gaussian_blur", "light"), ("gaussian_blur", "heavy"), ("haze", "light")]


def low_pass(x: torch.Tensor) -> torch.Tensor:
    k = torch.tensor([1.0, 4, 6, 4, 1])
    k = (k[:, None] * k[None]) / 256
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), k.expand(x.shape[1], 1, 5, 5), groups=x.shape[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--tracking-uri", default=None)
    parser.add_argument("--images", type=int, default=3)
    args = parser.parse_args()
    model, _ = load_restorer(resolve_product(args.model, "restorer", "model", args.tracking_uri))
    model.eval()
    files = sorted((REPO.parent / "shared/datasets/CBSD68").glob("*.png"))
    images = [image for image in (read_image(str(f)) for f in files) if image.shape[:2] == (321, 481)]
    clean = to_tensor(images[: args.images], "cpu")
    restore = FullImageRestorer(model, InferenceConfig(batch_size=1))
    degrader = Degrader(DegradationConfig(seed=0))
    keys = [f"floor/{i}" for i in range(len(clean))]
    print(f"{'input':<20} {'PSNR in':>8} {'out':>7} {'out vs in':>10} {'residual RMS':>13} {'low-pass':>9}")
    for kind, level in CASES:
        degraded = clean
        if kind != "clean":
            degraded = degrader(clean, keys, specs=[Spec(kind, level=level)] * len(clean))[0]
            degraded = degraded.clamp(0, 1).mul(255).round().div(255)
        out = torch.cat([restore(degraded[i : i + 1]) for i in range(len(degraded))])
        residual = out - degraded
        print(f"{kind + (' ' + level if level else ''):<20} {psnr(degraded, clean).mean():>8.2f} "
              f"{psnr(out, clean).mean():>7.2f} {psnr(out, degraded).mean():>10.2f} "
              f"{residual.pow(2).mean().sqrt():>13.4f} {low_pass(residual).pow(2).mean().sqrt():>9.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
