"""PSNR/SSIM on real photo crops, and the fixed held-out validation set."""

from __future__ import annotations

import torch

from _train_fixtures import build_tiny_shards, photo_crops
from perceive_ir.eval import HeldOutSet, ValidationConfig, evaluate, psnr, ssim


def test_psnr_and_ssim_order_by_damage():
    clean = photo_crops()
    gen = torch.Generator().manual_seed(0)
    light = (clean + 0.02 * torch.randn(clean.shape, generator=gen)).clamp(0, 1)
    heavy = (clean + 0.2 * torch.randn(clean.shape, generator=gen)).clamp(0, 1)
    assert torch.all(psnr(clean, clean) == 100.0) and torch.allclose(ssim(clean, clean), torch.ones(len(clean)))
    assert torch.all(psnr(light, clean) > psnr(heavy, clean)) and torch.all(ssim(light, clean) > ssim(heavy, clean))
    mse = (heavy - clean).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(psnr(heavy, clean), -10 * torch.log10(mse))
    assert torch.all(ssim(heavy, clean) < 0.9)


def test_held_out_set_is_fixed_and_scored_per_type(package_photos, tmp_path):
    shards = build_tiny_shards(package_photos, str(tmp_path / "shards"))
    cfg = ValidationConfig(images=3, patch_size=32, types=["gaussian_noise", "haze"], seed=5)
    a, b = HeldOutSet(cfg, shards), HeldOutSet(cfg, shards)
    for name in cfg.types:
        assert torch.equal(a.items[name][0], b.items[name][0]) and torch.equal(a.items[name][1], b.items[name][1])
    assert not torch.equal(a.items["gaussian_noise"][0], a.items["haze"][0])
    metrics, outputs = evaluate(lambda x: x, a)  # identity "restorer": output scores equal input scores
    for name in cfg.types:
        assert metrics[f"val/{name}/psnr_out"] == metrics[f"val/{name}/psnr_in"] < 100
    metrics, _ = evaluate(lambda x: a.clean, a, quality=lambda y: y.mean((1, 2, 3)))
    assert metrics["val/mean/psnr_out"] == 100.0 and metrics["val/mean/ssim_out"] > 0.999
    assert "val/haze/quality_out" in metrics and set(outputs) == set(cfg.types)
