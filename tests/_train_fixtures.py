"""Tiny training settings and an in-memory tracker for the training, job and evaluation tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch

from dataset_tools.build import BuildConfig, build_shards
from dataset_tools.sources import SourceSpec

TINY_NAFNET_RESTORER = {
    "backbone": {"name": "nafnet", "params": {"width": 8, "encoder_blocks": [1, 1, 1, 1], "middle_blocks": 1,
                                              "decoder_blocks": [1, 1, 1, 1]}},
    "conditioning": {"name": "none"},
}


def build_tiny_shards(photos: Path, output: str, storage_options: dict | None = None) -> str:
    """Package photos, downscaled to 160 px, 4 per shard."""
    build_shards(BuildConfig(output=output, sources=[SourceSpec("pkg", str(photos))], max_side=160,
                             max_samples_per_shard=4, progress=False, storage_options=dict(storage_options or {})))
    return output


class FolderTracker:
    """Keeps what the loop logs: metrics by name, copies of files and folders."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.metrics: dict[str, list[tuple[int, float]]] = {}
        self.tags: dict[str, str] = {}

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.metrics.setdefault(key, []).append((step, value))

    def set_tags(self, tags: dict[str, str]) -> None:
        self.tags.update(tags)

    def log_file(self, path, artifact_path=None) -> None:
        target = self.folder / (artifact_path or "")
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)

    def log_folder(self, path, artifact_path) -> None:
        shutil.copytree(path, self.folder / artifact_path, dirs_exist_ok=True)


def photo_crops(size: int = 64) -> torch.Tensor:
    """Crops of three real photos from scikit-image, 3 x size x size in [0, 1]."""
    from skimage import data

    crops = []
    for name in ("astronaut", "coffee", "chelsea"):
        image = torch.from_numpy(np.asarray(getattr(data, name)())[..., :3].copy()).permute(2, 0, 1).float() / 255
        crops.append(image[:, 100 : 100 + size, 100 : 100 + size])
    return torch.stack(crops)
