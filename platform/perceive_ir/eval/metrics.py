"""Whole-image PSNR and SSIM per image, on the images' device.

Conventions of the all-in-one papers' test scripts (PromptIR, AdaIR, MoCE-IR), which score with
scikit-image:

- PSNR: ``10 log10(1 / MSE)`` over all pixels and channels of images in [0, 1]
  (``peak_signal_noise_ratio(..., data_range=1)``); identical images are capped at 100 dB.
- SSIM: ``structural_similarity(..., data_range=1, channel_axis=...)`` with its defaults: a 7 x 7
  uniform window, K1 = 0.01, K2 = 0.03, sample covariances (N / (N - 1)), the mean over the valid
  region (3 pixels cut at each border), then over channels.
- SSIM is computed in torch on the images' device, equal to scikit-image's within 1e-4 (``tests/test_eval.py``
  checks it on real image pairs; ``backend="scikit-image"`` calls scikit-image itself);
- ``y_channel=True`` scores the BT.601 luma ``Y = (16 + 65.481 R + 128.553 G + 24.966 B) / 255``
  instead of RGB (the convention of Y-channel tables).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

__all__ = ["psnr", "ssim", "rgb_to_y", "SSIM_WINDOW"]

SSIM_WINDOW = 7


def rgb_to_y(images: torch.Tensor) -> torch.Tensor:
    """B x 3 x H x W RGB in [0, 1] -> B x 1 x H x W luma in [16/255, 235/255] (BT.601, MATLAB's rgb2ycbcr)."""
    weights = images.new_tensor([65.481, 128.553, 24.966]).view(1, 3, 1, 1)
    return (images * weights).sum(1, keepdim=True).add_(16.0).div_(255.0)


def _prepare(x: torch.Tensor, y: torch.Tensor, y_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"metrics need two B x C x H x W batches of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    x, y = x.float(), y.float()
    if y_channel:
        x, y = rgb_to_y(x), rgb_to_y(y)
    return x, y


def psnr(x: torch.Tensor, y: torch.Tensor, peak: float = 1.0, y_channel: bool = False) -> torch.Tensor:
    """B x C x H x W images in [0, peak] -> B PSNR values in dB (capped at 100 for identical images)."""
    x, y = _prepare(x, y, y_channel)
    mse = (x - y).pow(2).flatten(1).double().mean(1)  # float64 sum: exact to well under 1e-3 dB
    return (10 * torch.log10(peak**2 / mse.clamp_min(1e-10))).clamp_max(100.0).float()


def ssim(x: torch.Tensor, y: torch.Tensor, peak: float = 1.0, y_channel: bool = False,
         window: int = SSIM_WINDOW, backend: Literal["torch", "scikit-image"] = "torch") -> torch.Tensor:
    """B SSIM values, scikit-image's ``structural_similarity(data_range=peak)`` with its default window.

    ``backend="scikit-image"`` calls scikit-image itself (the reference; slower on a CPU, see benchmarks/bench_eval.py)."""
    x, y = _prepare(x, y, y_channel)
    if min(x.shape[-2:]) < window:
        raise ValueError(f"SSIM needs images of at least {window} x {window} pixels, got {tuple(x.shape[-2:])}")
    if backend == "scikit-image":
        return _ssim_scikit_image(x, y, peak, window)
    if backend != "torch":
        raise ValueError(f"unknown SSIM backend '{backend}'; known: torch, scikit-image")
    # One image at a time: its moments stay in cache (a whole batch at once is twice as slow on a CPU).
    # Never under autocast: moments in bf16 would be off by 1e-2.
    with torch.autocast(x.device.type, enabled=False):
        return torch.cat([_ssim_one(a[None], b[None], peak, window) for a, b in zip(x, y)])


def _ssim_one(x: torch.Tensor, y: torch.Tensor, peak: float, window: int) -> torch.Tensor:
    # Variances are small differences of larger moments; centring the image first keeps the moments
    # small, so float32 stays within about 1e-5 of scikit-image's float64 (6e-6 at most on CBSD68 at sigma 25).
    offset = y.mean()
    x, y = x - offset, y - offset
    moments = _box_mean(torch.cat([x, y, x * x, y * y, x * y], dim=1), window)
    mu_x, mu_y, xx, yy, xy = moments.chunk(5, dim=1)
    unbiased = window * window / (window * window - 1)
    var_sum = (xx + yy - mu_x * mu_x - mu_y * mu_y).mul_(unbiased)
    cov = (xy - mu_x * mu_y).mul_(unbiased)
    # The luminance term uses the uncentred means.
    mx, my = mu_x + offset, mu_y + offset
    c1, c2 = (0.01 * peak) ** 2, (0.03 * peak) ** 2
    num = (2 * mx * my + c1) * (2 * cov + c2)
    den = (mx * mx + my * my + c1) * (var_sum + c2)
    ratio = num / den
    if ratio.device.type != "mps":  # MPS has no float64
        ratio = ratio.double()
    return ratio.mean().float().view(1)


def _box_mean(maps: torch.Tensor, window: int) -> torch.Tensor:
    """The mean over each window x window square inside B x C x H x W maps, in two 1-D passes: the valid
    region of scikit-image's uniform filter, which it then crops by (window - 1) / 2 at each border."""
    if maps.device.type == "cpu":  # depthwise convolutions: twice as fast as pooling on a CPU
        row = torch.full((maps.shape[1], 1, 1, window), 1.0 / window, dtype=maps.dtype)
        return F.conv2d(F.conv2d(maps, row, groups=maps.shape[1]), row.transpose(2, 3), groups=maps.shape[1])
    # Pooling elsewhere: cuDNN may run float32 convolutions in TF32, far too coarse for SSIM.
    return F.avg_pool2d(F.avg_pool2d(maps, (1, window), stride=1), (window, 1), stride=1)


def _ssim_scikit_image(x: torch.Tensor, y: torch.Tensor, peak: float, window: int) -> torch.Tensor:
    from skimage.metrics import structural_similarity

    pairs = zip(x.detach().cpu().double().numpy(), y.detach().cpu().double().numpy())
    values = [structural_similarity(a, b, data_range=peak, win_size=window, channel_axis=0) for a, b in pairs]
    return torch.tensor(values, dtype=torch.float32, device=x.device)
