"""PNG grids: the fixed validation crops per type (degraded, restored, clean), and captioned rows of
whole test images (the best and worst of an evaluation)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

__all__ = ["save_grid", "save_comparison_grid"]


def save_grid(path: str | Path, held_out, outputs: dict[str, torch.Tensor], per_type: int = 2) -> Path:
    rows = []
    for name, restored in outputs.items():
        degraded, clean = held_out.items[name]
        n = min(per_type, restored.shape[0])
        tiles = [t for i in range(n) for t in (degraded[i], restored[i], clean[i])]
        rows.append(torch.cat([t.detach().float().cpu() for t in tiles], dim=2))
    grid = torch.cat(rows, dim=1).clamp(0, 1)
    array = (grid.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def save_comparison_grid(path: str | Path, rows: list[tuple[str, tuple[np.ndarray, ...]]], height: int = 192) -> Path:
    """One row per image: a caption above its tiles (e.g. degraded, restored, clean, uint8 H x W x 3),
    each scaled to ``height`` pixels."""
    from PIL import ImageDraw

    caption = 16
    scaled = [[Image.fromarray(t).resize((max(1, round(t.shape[1] * height / t.shape[0])), height)) for t in tiles]
              for _, tiles in rows]
    width = max(sum(t.width for t in tiles) for tiles in scaled)
    sheet = Image.new("RGB", (width, len(rows) * (height + caption)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, ((label, _), tiles) in enumerate(zip(rows, scaled)):
        top = r * (height + caption)
        draw.text((4, top + 2), label, fill="black")
        left = 0
        for tile in tiles:
            sheet.paste(tile, (left, top + caption))
            left += tile.width
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path
