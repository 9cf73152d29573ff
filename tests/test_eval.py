"""PSNR/SSIM on real photo crops and stored benchmark pairs (against scikit-image), and the fixed
held-out validation set."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from _train_fixtures import build_tiny_shards, photo_crops
from conftest import shared_dataset
from perceive_ir.eval import HeldOutSet, ValidationConfig, evaluate, psnr, ssim
from perceive_ir.eval.metrics import rgb_to_y


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


def _assert_matches_scikit_image(pairs: list[tuple[np.ndarray, np.ndarray]], device: str = "cpu") -> None:
    """float64 H x W x 3 pairs (output, reference) in [0, 1]: RGB and Y-channel, batched per size."""
    for out, ref in pairs:
        x, y = (torch.from_numpy(a).permute(2, 0, 1)[None].float().to(device) for a in (out, ref))
        expected_psnr = peak_signal_noise_ratio(ref, out, data_range=1)
        expected_ssim = structural_similarity(ref, out, data_range=1, channel_axis=2)
        assert abs(psnr(x, y).item() - expected_psnr) < 1e-3
        y_out, y_ref = (rgb_to_y(t)[0, 0].double().cpu().numpy() for t in (x, y))
        assert abs(psnr(x, y, y_channel=True).item() - peak_signal_noise_ratio(y_ref, y_out, data_range=1)) < 1e-3
        assert abs(ssim(x, y).item() - expected_ssim) < 1e-4
        expected_y = structural_similarity(y_ref, y_out, data_range=1)
        assert abs(ssim(x, y, y_channel=True).item() - expected_y) < 1e-4
    same = [p for p in pairs if p[0].shape == pairs[0][0].shape]
    batch = [torch.from_numpy(np.stack(a)).permute(0, 3, 1, 2).float().to(device) for a in zip(*same)]
    singles = torch.cat([ssim(o[None], r[None]) for o, r in zip(*batch)])  # a batch scores each image on its own
    torch.testing.assert_close(ssim(*batch), singles)
    torch.testing.assert_close(ssim(*batch, backend="scikit-image"), singles, atol=1e-4, rtol=0)


def _stored_benchmark_pairs() -> list[tuple[np.ndarray, np.ndarray]]:
    cbsd68 = sorted(shared_dataset("CBSD68").glob("*.png"))[:3]
    rain = shared_dataset("Rain100L_subset3")
    pairs = [(d, c) for i, p in enumerate(cbsd68) for c in [_read(p)] for d in _damaged_versions(c, i)]
    return pairs + [(_read(p), _read(rain / "target" / p.name)) for p in sorted((rain / "input").glob("*.png"))]


def _read(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float64) / 255


def _damaged_versions(clean: np.ndarray, seed: int) -> list[np.ndarray]:
    """8-bit noisy (sigma 25) and blurred versions of a clean image."""
    from scipy.ndimage import uniform_filter

    rng = np.random.default_rng(seed)
    noisy = np.round(np.clip(clean + rng.normal(0, 25 / 255, clean.shape), 0, 1) * 255) / 255
    blurred = np.round(uniform_filter(clean, size=(5, 5, 1)) * 255) / 255
    return [noisy, blurred]


def test_metrics_equal_scikit_image_on_photos():
    crops = [c.permute(1, 2, 0).double().numpy() for c in photo_crops(96)]
    _assert_matches_scikit_image([(d, c) for i, c in enumerate(crops) for d in _damaged_versions(c, i)])


def test_metrics_equal_scikit_image_on_stored_benchmark_pairs():
    _assert_matches_scikit_image(_stored_benchmark_pairs())


def test_metrics_stay_exact_inside_a_bf16_autocast_region():
    """Validation may score inside the training step's autocast: SSIM must not run in bf16."""
    crops = [c.permute(1, 2, 0).double().numpy() for c in photo_crops(96)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _assert_matches_scikit_image([(d, c) for i, c in enumerate(crops) for d in _damaged_versions(c, i)])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_metrics_on_the_gpu_equal_scikit_image():
    _assert_matches_scikit_image(_stored_benchmark_pairs(), device="cuda")


def test_the_scorer_imports_without_torchvision():
    """An evaluation actor starts 1.5 s sooner when nothing it imports loads torchvision."""
    import subprocess
    import sys

    code = "import sys, perceive_ir.eval.scoring, perceive_ir.products; print('torchvision' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_ssim_refuses_images_below_its_window():
    with pytest.raises(ValueError, match="at least 7 x 7"):
        ssim(torch.rand(1, 3, 6, 40), torch.rand(1, 3, 6, 40))
