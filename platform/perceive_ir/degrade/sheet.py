"""Render a contact sheet: one photo x every degradation type x three severities.

    python -m perceive_ir.degrade.sheet --out docs/images/contact_sheet.png

The default photo ships with scikit-image, so this runs offline anywhere.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from . import Degrader, DegradationConfig, LEVELS, Spec, names

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")
LABEL_HEIGHT = 26  # two text lines


def load_photo(name_or_path: str, size: int) -> torch.Tensor:
    """A square centre crop resized to ``size``, as a 1 x 3 x size x size float tensor."""
    if name_or_path in PHOTOS:
        import skimage.data

        array = getattr(skimage.data, name_or_path)()
    else:
        array = np.asarray(Image.open(name_or_path).convert("RGB"))
    h, w = array.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    image = Image.fromarray(array[top : top + side, left : left + side]).resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float().div(255.0).unsqueeze(0)


def _short(name: str) -> str:
    """A type name that fits three to a tile label (gaussian_noise -> noise)."""
    return name.replace("gaussian_", "").replace("_noise", "").replace("_blur", " blur")


def _tile(image: torch.Tensor, label: str) -> Image.Image:
    array = image.clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy()
    tile = Image.new("RGB", (array.shape[1], array.shape[0] + LABEL_HEIGHT), "white")
    tile.paste(Image.fromarray(array), (0, LABEL_HEIGHT))
    ImageDraw.Draw(tile).multiline_text((3, 1), label, fill="black", spacing=1)
    return tile


def render(photo: str = "astronaut", tile: int = 160, seed: int = 0, device: str = "cpu") -> Image.Image:
    clean = load_photo(photo, tile).to(device)
    degrader = Degrader(DegradationConfig(seed=seed))
    types = names()
    levels = list(LEVELS)
    batch = clean.expand(len(types) * len(levels), -1, -1, -1)
    specs = [Spec(t, level=level) for t in types for level in levels]
    # One key for every tile: the nuisances (angles, drops, chain) stay the same
    # across severities, so each row shows the severity alone changing.
    degraded, labels = degrader(batch, keys=["contact-sheet"] * len(specs), specs=specs)
    cell_h = tile + LABEL_HEIGHT
    sheet = Image.new("RGB", (tile * len(levels), cell_h * (len(types) + 1)), "white")
    sheet.paste(_tile(clean[0], f"clean: {photo}"), (0, 0))
    for i, spec in enumerate(specs):
        row, col = divmod(i, len(levels))
        severity = float(labels.severity[i])
        label = f"{spec.type}\n{spec.level} (severity {severity:.2f})"
        if spec.type == "mixed":
            chain = " > ".join(_short(step["type"]) for step in labels.params[i]["steps"])
            label = f"mixed {spec.level}\n{chain}"
        sheet.paste(_tile(degraded[i], label), (col * tile, (row + 1) * cell_h))
    return sheet


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/images/contact_sheet.png"))
    parser.add_argument("--photo", default="astronaut", help=f"one of {', '.join(PHOTOS)} or an image path")
    parser.add_argument("--tile", type=int, default=160, help="tile side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    sheet = render(args.photo, args.tile, args.seed, args.device)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out, optimize=True)
    print(f"wrote {args.out} ({sheet.width} x {sheet.height})")


if __name__ == "__main__":
    main()
