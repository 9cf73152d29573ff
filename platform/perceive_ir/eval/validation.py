"""A fixed, seeded held-out set: the same clean crops, degraded the same way, at every validation.

Clean crops come from a shard source: the ``images`` most textured of the first
``4 * images`` crops of a seeded, single-rank stream (flat crops, such as sky, would make the
per-image PSNR of blur or haze meaningless); each validation type degrades all of them at one
named level with the seeded engine.
``evaluate`` scores input and output against the clean crops, per type; ``mean_psnr`` gives one
number, the output PSNR over every pair (the probe of L_dpl's ``reference`` difficulty rule).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from perceive_ir.degrade import DegradationConfig, Degrader, Spec
from perceive_ir.eval.metrics import psnr, ssim

__all__ = ["ValidationConfig", "HeldOutSet", "evaluate", "mean_psnr"]


@dataclass
class ValidationConfig:
    source: Optional[str] = None  # shard folder or manifest; None: the first training source
    images: int = 4
    patch_size: int = 64
    types: list[str] = field(default_factory=lambda: ["gaussian_noise", "gaussian_blur", "rain", "haze", "low_light"])
    level: str = "medium"
    seed: int = 1234

    def __post_init__(self) -> None:
        if self.images < 1 or self.patch_size < 8:
            raise ValueError("validation needs images >= 1 and patch_size >= 8")
        if not self.types:
            raise ValueError("validation needs at least one degradation type")


class HeldOutSet:
    """``items[type] = (degraded, clean)``, built once, identical across runs and restarts."""

    def __init__(self, cfg: ValidationConfig, default_source: str, storage_options: dict[str, Any] | None = None):
        from perceive_ir.data.pipeline import LoaderConfig, ShardSourceConfig, build_loader

        loader = LoaderConfig(
            sources=[ShardSourceConfig(cfg.source or default_source)],
            patch_size=cfg.patch_size,
            batch_size=4 * cfg.images,
            samples_per_epoch=4 * cfg.images,
            num_workers=0,
            shuffle_buffer=max(8, 4 * cfg.images),
            flips=False,
            seed=cfg.seed,
            storage_options=dict(storage_options or {}),
        )
        batch = next(iter(build_loader(loader, rank=0, world_size=1)))
        candidates = batch["gt"]
        texture = candidates.mean(dim=1).flatten(1).std(dim=1)
        chosen = texture.argsort(descending=True, stable=True)[: cfg.images]
        self.clean = candidates[chosen]
        # The clean identity of each crop: the medium tier scores a crop with the hold-out restorer
        # that never trained on its clean image (when validation shares images with training).
        self.keys = [batch["clean_id"][i] for i in chosen.tolist()]
        seeds = [f"validation/{i}" for i in range(cfg.images)]
        degrader = Degrader(DegradationConfig(seed=cfg.seed))
        self.items: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for name in cfg.types:
            degraded, _ = degrader(self.clean, seeds, specs=[Spec(name, level=cfg.level)] * cfg.images)
            self.items[name] = (degraded.clamp(0, 1), self.clean)

    def to(self, device: torch.device) -> "HeldOutSet":
        self.items = {k: (d.to(device), c.to(device)) for k, (d, c) in self.items.items()}
        return self


@torch.no_grad()
def evaluate(
    restore: Callable[[torch.Tensor], torch.Tensor],
    held_out: HeldOutSet,
    quality: Callable[[torch.Tensor], torch.Tensor] | None = None,
    prefix: str = "val",
) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Metrics ``{prefix}/{type}/{psnr,ssim}_{in,out}`` (+ ``quality_out``) and their means over types,
    plus the restored images per type (for the image grid)."""
    metrics: dict[str, float] = {}
    outputs: dict[str, torch.Tensor] = {}
    sums: dict[str, float] = {}
    for name, (degraded, clean) in held_out.items.items():
        restored = restore(degraded).float().clamp(0, 1)
        outputs[name] = restored
        values = {
            "psnr_in": psnr(degraded, clean).mean().item(),
            "psnr_out": psnr(restored, clean).mean().item(),
            "ssim_in": ssim(degraded, clean).mean().item(),
            "ssim_out": ssim(restored, clean).mean().item(),
        }
        if quality is not None:
            values["quality_out"] = quality(restored).float().mean().item()
        for key, value in values.items():
            metrics[f"{prefix}/{name}/{key}"] = value
            sums[key] = sums.get(key, 0.0) + value
    for key, total in sums.items():
        metrics[f"{prefix}/mean/{key}"] = total / len(held_out.items)
    return metrics, outputs


@torch.no_grad()
def mean_psnr(restore: Callable[[torch.Tensor], torch.Tensor], held_out: HeldOutSet) -> float:
    """Mean PSNR of ``restore``'s outputs against the clean crops, over every type and image."""
    values = [psnr(restore(degraded).float().clamp(0, 1), clean) for degraded, clean in held_out.items.values()]
    return torch.cat(values).mean().item()
