"""Full-image inference: reflect-pad to the backbone's multiple, crop back, tile large images.

Images above ``tile_size`` (either side) are cut into tiles of ``tile_size`` that overlap by at least
``tile_overlap``; every output pixel is taken from the tile in which it lies farthest from a cut
(the cut between two tiles is the middle of their overlap), so a network whose receptive field
reaches less than ``tile_overlap / 2`` pixels gives exactly its untiled result. Tile origins lie on
the backbone's multiple, so U-Net downsampling grids agree between tiles.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["InferenceConfig", "FullImageRestorer", "batch_size_on", "pad_multiple", "pad_reflect", "tile_spans"]


@dataclass
class InferenceConfig:
    precision: Literal["fp32", "bf16"] = "fp32"  # the papers' numbers are fp32
    tile_size: Optional[int] = 1024  # tile images with a side above this; None: never tile
    tile_overlap: int = 64
    # Images of one padded size restored together; None: 1 on a CPU (a batch of 4 costs 30% more per
    # image there, its activations fall out of cache), 4 on an accelerator.
    batch_size: Optional[int] = None
    pad_multiple: Optional[int] = None  # None: from the backbone (Restormer 8, NAFNet 2^levels)

    def __post_init__(self) -> None:
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"inference.batch_size must be >= 1, got {self.batch_size}")
        if self.tile_overlap < 0:
            raise ValueError(f"inference.tile_overlap must be >= 0, got {self.tile_overlap}")
        if self.tile_size is not None and self.tile_size <= self.tile_overlap:
            raise ValueError(f"inference.tile_size ({self.tile_size}) must exceed tile_overlap ({self.tile_overlap})")
        if self.pad_multiple is not None and self.pad_multiple < 1:
            raise ValueError(f"inference.pad_multiple must be >= 1, got {self.pad_multiple}")


def batch_size_on(cfg: InferenceConfig, device: torch.device) -> int:
    return cfg.batch_size or (1 if device.type == "cpu" else 4)


def pad_multiple(model: nn.Module) -> int:
    """The size multiple a restorer's U-Net needs: the largest over its known backbones, else 8."""
    from perceive_ir.models.nafnet import NAFNet
    from perceive_ir.models.restormer import Restormer

    found = [8 for m in model.modules() if isinstance(m, Restormer)]
    found += [2 ** len(m.cfg.encoder_blocks) for m in model.modules() if isinstance(m, NAFNet)]
    return max(found, default=8)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def pad_reflect(images: torch.Tensor, multiple: int) -> torch.Tensor:
    """Reflect-pad the bottom and right of B x C x H x W up to multiples of ``multiple``."""
    h, w = images.shape[-2:]
    ph, pw = _round_up(h, multiple) - h, _round_up(w, multiple) - w
    if not (ph or pw):
        return images
    # reflect needs a pad below the size; tiny images fall back to edge replication
    mode = "reflect" if ph < h and pw < w else "replicate"
    return F.pad(images, (0, pw, 0, ph), mode=mode)


def tile_spans(length: int, tile: int, overlap: int, multiple: int) -> list[tuple[int, int, int, int]]:
    """``(start, end, keep_start, keep_end)`` per tile along one axis of a padded ``length``
    (a multiple of ``multiple``): the tiles cover [0, length), their kept parts partition it."""
    tile = max(multiple, tile // multiple * multiple)
    if length <= tile:
        return [(0, length, 0, length)]
    step = max(multiple, (tile - overlap) // multiple * multiple)
    starts = list(range(0, length - tile, step)) + [length - tile]
    spans = []
    for i, start in enumerate(starts):
        keep_start = 0 if i == 0 else (starts[i - 1] + tile + start) // 2
        keep_end = length if i == len(starts) - 1 else (start + tile + starts[i + 1]) // 2
        spans.append((start, start + tile, keep_start, keep_end))
    return spans


class FullImageRestorer:
    """``restored = FullImageRestorer(model, cfg)(degraded)``: B x 3 x H x W in, same size out, clamped to
    [0, 1], float32, on the input's device."""

    def __init__(self, model: nn.Module | Callable[[torch.Tensor], torch.Tensor], cfg: InferenceConfig,
                 multiple: int | None = None) -> None:
        self.model, self.cfg = model, cfg
        if multiple is None:
            multiple = cfg.pad_multiple or (pad_multiple(model) if isinstance(model, nn.Module) else 1)
        self.multiple = multiple

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.precision == "bf16":
            with torch.autocast(x.device.type, dtype=torch.bfloat16):
                return self.model(x).float()
        return self.model(x).float()

    def _tiled(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        size, overlap = self.cfg.tile_size, self.cfg.tile_overlap
        out = torch.empty_like(x[:, :3])
        for y0, y1, ky0, ky1 in tile_spans(h, size, overlap, self.multiple):
            for x0, x1, kx0, kx1 in tile_spans(w, size, overlap, self.multiple):
                restored = self._forward(x[..., y0:y1, x0:x1])
                out[..., ky0:ky1, kx0:kx1] = restored[..., ky0 - y0 : ky1 - y0, kx0 - x0 : kx1 - x0]
        return out

    @torch.no_grad()
    def __call__(self, degraded: torch.Tensor) -> torch.Tensor:
        h, w = degraded.shape[-2:]
        x = pad_reflect(degraded.float(), self.multiple)
        size = self.cfg.tile_size
        restored = self._tiled(x) if size is not None and max(h, w) > size else self._forward(x)
        return restored[..., :h, :w].clamp(0, 1)
