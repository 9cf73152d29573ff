"""A PNG grid of the fixed validation images: per type, a row of degraded, restored and clean crops."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

__all__ = ["save_grid"]


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
