"""Tiny configurations and real image crops for the model, perceiver and loss tests."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
DATASETS = REPO.parent / "shared" / "datasets"
TINY_CLIP_JSON = REPO / "configs" / "models" / "clip_tiny.json"

TINY_RESTORMER = {
    "dim": 8,
    "blocks": [1, 1, 1, 1],
    "heads": [1, 2, 2, 4],
    "refinement_blocks": 1,
    "prompt_dims": [8, 8, 16],
    "prompt_sizes": [8, 4, 2],
}
TINY_NAFNET = {"width": 8, "encoder_blocks": [1, 1, 1, 1], "middle_blocks": 1, "decoder_blocks": [1, 1, 1, 1]}
TINY_SEMANTIC = {
    "model": "vit_small_patch14_dinov2",
    "pretrained": False,
    "layers": [0, 1, 2, 3],
    "image_size": 28,
    "model_kwargs": {"img_size": 28, "depth": 4, "embed_dim": 32, "num_heads": 2},
}
TINY_CONDITIONING = {
    "code_dim": 16,
    "cfe_widths": [8, 16, 16, 16],
    "semantic": TINY_SEMANTIC,
    "film_hidden": 32,
}
TINY_VGG = {"pretrained": False, "widths": [8, 16, 16, 32, 32], "layers": [3, 8, 15, 22]}

TRAIN_PHOTOS = ("astronaut", "coffee", "chelsea")
HELD_OUT_PHOTOS = ("rocket", "immunohistochemistry")


def photo(name: str) -> torch.Tensor:
    """A scikit-image photo as a 3 x H x W float tensor in [0, 1]."""
    from skimage import data

    image = np.asarray(getattr(data, name)())
    if image.ndim == 2:
        image = np.stack([image] * 3, -1)
    return torch.from_numpy(image[..., :3].copy()).permute(2, 0, 1).float() / 255.0


def random_crops(names, n: int, size: int, seed: int) -> torch.Tensor:
    """``n`` random ``size`` crops, cycling over the named photos, downscaled 2x for more content per crop."""
    gen = torch.Generator().manual_seed(seed)
    images = [F.avg_pool2d(photo(name)[None], 2)[0] for name in names]
    crops = []
    for i in range(n):
        image = images[i % len(images)]
        top = int(torch.randint(0, image.shape[1] - size + 1, (1,), generator=gen))
        left = int(torch.randint(0, image.shape[2] - size + 1, (1,), generator=gen))
        crops.append(image[:, top : top + size, left : left + size])
    return torch.stack(crops)


def add_noise(x: torch.Tensor, sigma: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (x + sigma * torch.randn(x.shape, generator=gen)).clamp(0, 1)


def blur(x: torch.Tensor, k: int = 5) -> torch.Tensor:
    return F.avg_pool2d(F.pad(x, (k // 2,) * 4, mode="reflect"), k, stride=1)


def tiny_clip_file(path: Path, seed: int) -> Path:
    """Weights of a randomly initialised tiny CLIP, saved as a safetensors file (a CLIP identity)."""
    import open_clip
    from safetensors.torch import save_file

    open_clip.add_model_config(TINY_CLIP_JSON)
    torch.manual_seed(seed)
    model = open_clip.create_model("clip_tiny", pretrained=None)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def tiny_perceiver(clip_file: Path, **overrides):
    from perceive_ir.models import PerceiverConfig

    torch.manual_seed(0)
    cfg = PerceiverConfig(
        architecture="clip_tiny",
        pretrained=None,
        clip_weights=str(clip_file),
        arch_config=str(TINY_CLIP_JSON),
        **overrides,
    )
    return cfg.build()


def requires_datasets(folder: str) -> Path:
    path = DATASETS / folder
    if not path.is_dir():
        pytest.skip(f"benchmark images not found at ../shared/datasets/{folder} (only present next to the repository)")
    return path
