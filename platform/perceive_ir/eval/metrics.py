"""Whole-image PSNR and SSIM per image, batched, on the images' device (float64 accumulation).

Conventions of the all-in-one papers' test scripts (PromptIR, AdaIR, MoCE-IR), which score with
scikit-image:

- PSNR: ``10 log10(1 / MSE)`` over all pixels and channels of images in [0, 1]
  (``peak_signal_noise_ratio(..., data_range=1)``); identical images are capped at 100 dB.
- SSIM: ``structural_similarity(..., data_range=1, channel_axis=...)`` with its defaults: a 7 x 7
  uniform window, K1 = 0.01, K2 = 0.03, sample covariances (N / (N - 1)), the mean over the valid
  region (3 pixels cut at each border), then over channels.
- on the CPU, SSIM is scikit-image's own function; on an accelerator, the torch code below, equal to it
  within 1e-4 (``tests/test_eval.py`` checks both on real image pairs);
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
         window: int = SSIM_WINDOW, backend: Literal["auto", "torch", "scikit-image"] = "auto") -> torch.Tensor:
    """B SSIM values, scikit-image's ``structural_similarity(data_range=peak)`` with its default window.

    ``backend``: ``auto`` calls scikit-image itself for tensors on the CPU (its separable SciPy filter
    is several times faster there than torch's float64 pooling) and the torch code on an accelerator."""
    x, y = _prepare(x, y, y_channel)
    if min(x.shape[-2:]) < window:
        raise ValueError(f"SSIM needs images of at least {window} x {window} pixels, got {tuple(x.shape[-2:])}")
    if backend == "scikit-image" or (backend == "auto" and x.device.type == "cpu"):
        return _ssim_scikit_image(x, y, peak, window)
    if backend not in ("auto", "torch"):
        raise ValueError(f"unknown SSIM backend '{backend}'; known: auto, torch, scikit-image")
    # Variances are small differences of larger moments: float64 keeps them exact to ~1e-12, float32
    # would drift by ~1e-5 SSIM depending on the summation order (batch size, threads).
    if x.device.type != "mps":
        x, y = x.double(), y.double()
    # Centring each image first keeps the moments small.
    offset = y.mean(dim=(1, 2, 3), keepdim=True)
    x, y = x - offset, y - offset
    n = window * window
    c1, c2 = (0.01 * peak) ** 2, (0.03 * peak) ** 2
    # One pooling pass over the five moments: the valid region of a uniform filter is scikit-image's
    # filtered image cropped by (window - 1) / 2 at each border.
    moments = F.avg_pool2d(torch.cat([x, y, x * x, y * y, x * y], dim=1), window, stride=1)
    mu_x, mu_y, xx, yy, xy = moments.chunk(5, dim=1)
    unbiased = n / (n - 1)
    var_x = unbiased * (xx - mu_x * mu_x)
    var_y = unbiased * (yy - mu_y * mu_y)
    cov = unbiased * (xy - mu_x * mu_y)
    # The SSIM luminance term uses the uncentred means.
    mx, my = mu_x + offset, mu_y + offset
    num = (2 * mx * my + c1) * (2 * cov + c2)
    den = (mx * mx + my * my + c1) * (var_x + var_y + c2)
    return (num / den).flatten(1).mean(1).float()


def _ssim_scikit_image(x: torch.Tensor, y: torch.Tensor, peak: float, window: int) -> torch.Tensor:
    from skimage.metrics import structural_similarity

    pairs = zip(x.detach().cpu().double().numpy(), y.detach().cpu().double().numpy())
    values = [structural_similarity(a, b, data_range=peak, win_size=window, channel_axis=0) for a, b in pairs]
    return torch.tensor(values, dtype=torch.float32, device=x.device)
