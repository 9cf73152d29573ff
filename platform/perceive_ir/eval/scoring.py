"""Score work items with one restorer: read, degrade (seeded), restore full images, measure.

:class:`Scorer` knows nothing of Ray: the protocol runs one per worker, tests and the benchmark
call it directly.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Sequence

import numpy as np
import torch

from perceive_ir.data.images import decode_rgb8
from perceive_ir.data.storage import open_url
from perceive_ir.degrade import DegradationConfig, Degrader, Spec
from perceive_ir.eval.inference import FullImageRestorer, InferenceConfig, batch_size_on
from perceive_ir.eval.metrics import psnr, ssim
from perceive_ir.eval.suite import Item

__all__ = ["Scorer", "Record", "read_image", "image_size", "to_tensor", "to_uint8"]


@dataclass
class Record:
    set: str
    type: str
    level: str
    severity: float
    image: str
    height: int
    width: int
    psnr_in: float
    psnr_out: float
    ssim_in: float
    ssim_out: float


def read_image(url: str, shard: str | None = None) -> np.ndarray:
    """H x W x 3 uint8 from a file URL, or from a member of a tar shard."""
    if shard is not None:
        from perceive_ir.data.tar_members import read_member

        data = read_member(shard, url)
    else:
        with open_url(url, "rb") as f:
            data = f.read()
    return decode_rgb8(data, url)[0]


def to_tensor(images: Sequence[np.ndarray], device: torch.device) -> torch.Tensor:
    batch = torch.from_numpy(np.stack(images)).to(device)
    return batch.permute(0, 3, 1, 2).float().div_(255.0)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    return (images.clamp(0, 1).mul(255).round().byte().permute(0, 2, 3, 1).cpu().numpy())


@lru_cache(maxsize=None)
def image_size(item: Item) -> tuple[int, int]:
    """(H, W) of an item's clean image, from the image header: nothing is decoded."""
    import io

    from PIL import Image

    if item.shard is not None:
        from perceive_ir.data.tar_members import read_member

        with Image.open(io.BytesIO(read_member(item.shard, item.clean))) as img:
            return img.size[::-1]
    with open_url(item.clean, "rb") as f, Image.open(f) as img:
        return img.size[::-1]


class Scorer:
    """``records = Scorer(model, ...).score(items)``; items of one batch need not share a size."""

    def __init__(self, model: torch.nn.Module | Callable[[torch.Tensor], torch.Tensor], inference: InferenceConfig,
                 seed: int = 0, quantize_input: bool = True, y_channel: bool = False,
                 device: torch.device | str = "cpu", multiple: int | None = None) -> None:
        self.device = torch.device(device)
        self.restore = FullImageRestorer(model, inference, multiple)
        self.degrader = Degrader(DegradationConfig(seed=seed))
        self.inference, self.quantize, self.y_channel = inference, quantize_input, y_channel

    def _inputs(self, items: Sequence[Item]) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
        """Degraded and clean batches (one size) and the severities."""
        clean = to_tensor([read_image(i.clean, i.shard) for i in items], self.device)
        if items[0].degraded is not None:
            degraded = to_tensor([read_image(i.degraded, i.shard) for i in items], self.device)
            if degraded.shape != clean.shape:
                raise ValueError(f"set '{items[0].set}': '{items[0].image}' input and target sizes differ")
            return degraded, clean, [math.nan] * len(items)
        keys = [f"{i.set}/{i.image}" for i in items]
        specs = [Spec(i.type, level=i.level) for i in items]
        degraded, labels = self.degrader(clean, keys, specs=specs)
        degraded = degraded.clamp(0, 1)
        if self.quantize:
            degraded = degraded.mul(255).round().div(255)
        return degraded, clean, labels.severity.tolist()

    def _batches(self, items: Sequence[Item]):
        """Items grouped by image size, then cut into batches."""
        groups: dict[tuple, list[Item]] = defaultdict(list)
        for item in items:
            groups[item.degraded is None, image_size(item)].append(item)
        size = batch_size_on(self.inference, self.device)
        for members in groups.values():
            for start in range(0, len(members), size):
                yield members[start : start + size]

    def score(self, items: Sequence[Item]) -> list[Record]:
        records = []
        for batch in self._batches(items):
            degraded, clean, severities = self._inputs(batch)
            restored = self.restore(degraded)
            values = [f(x, clean, y_channel=self.y_channel).tolist()
                      for x in (degraded, restored) for f in (psnr, ssim)]
            for i, item in enumerate(batch):
                records.append(Record(item.set, item.type, item.level, severities[i], item.image,
                                      clean.shape[-2], clean.shape[-1],
                                      values[0][i], values[2][i], values[1][i], values[3][i]))
        return records

    def images(self, items: Sequence[Item]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(degraded, restored, clean) uint8 H x W x 3 per item, in the items' order."""
        out = []
        for item in items:
            degraded, clean, _ = self._inputs([item])
            restored = self.restore(degraded)
            out.append(tuple(to_uint8(t)[0] for t in (degraded, restored, clean)))
        return out
