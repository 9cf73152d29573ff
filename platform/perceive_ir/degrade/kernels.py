"""Per-sample blur kernels and their batched application by FFT.

Kernels are evaluated on a small offset grid per sample and embedded (wrapped) in the
FFT canvas, so every sample gets its own kernel (any size, angle or shape) and one
batched FFT filters the whole batch. The cost does not grow with the kernel size, which matters
for 21 px blur kernels and 55 px rain streaks; all kernels here are point-symmetric,
so convolution and correlation agree.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["fast_len", "wrapped_grid", "centred_grid", "embed_kernels", "gaussian_kernel", "line_kernel", "fft_filter", "circular_filter", "pack_pairs", "unpack_pairs"]


def fast_len(n: int) -> int:
    """The smallest 2-3-5-7-smooth integer >= n (a size FFT libraries handle fast)."""
    best = n
    while True:
        m = best
        for p in (2, 3, 5, 7):
            while m % p == 0:
                m //= p
        if m == 1:
            return best
        best += 1


def wrapped_grid(height: int, width: int, device: torch.device, dtype=torch.float32):
    """Signed offsets (dy, dx) of each canvas cell from the origin, wrapping around."""
    ys = torch.arange(height, device=device, dtype=dtype)
    xs = torch.arange(width, device=device, dtype=dtype)
    ys = torch.where(ys > height // 2, ys - height, ys)
    xs = torch.where(xs > width // 2, xs - width, xs)
    return ys.view(1, 1, height, 1), xs.view(1, 1, 1, width)


def _column(values: torch.Tensor) -> torch.Tensor:
    return values.view(-1, 1, 1, 1)


def gaussian_kernel(sigma_major, sigma_minor, theta, size, dy, dx) -> torch.Tensor:
    """Anisotropic Gaussians (major axis at angle ``theta``) truncated to ``size`` x ``size``
    and normalised; per-sample (B,) parameters, (B, 1, h, w) kernels on the grid."""
    cos, sin = _column(torch.cos(theta)), _column(torch.sin(theta))
    along = dx * cos + dy * sin
    across = -dx * sin + dy * cos
    weights = torch.exp(
        -0.5 * ((along / _column(sigma_major)) ** 2 + (across / _column(sigma_minor)) ** 2)
    )
    radius = _column(torch.div(size, 2, rounding_mode="floor"))
    inside = (dx.abs() <= radius) & (dy.abs() <= radius)
    weights = weights * inside
    return weights / weights.sum(dim=(-2, -1), keepdim=True)


def line_kernel(length, angle, width, dy, dx) -> torch.Tensor:
    """Anti-aliased straight segments centred on the origin, direction ``angle`` (radians,
    from the x axis), ``length`` and ``width`` in pixels; peak weight 1, not normalised."""
    cos, sin = _column(torch.cos(angle)), _column(torch.sin(angle))
    along = dx * cos + dy * sin
    across = -dx * sin + dy * cos
    along_w = (_column(length) * 0.5 + 0.5 - along.abs()).clamp_(0.0, 1.0)
    across_w = (_column(width) * 0.5 + 0.5 - across.abs()).clamp_(0.0, 1.0)
    return along_w * across_w


def embed_kernels(small: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, 1, 2r+1, 2r+1) kernels centred on their middle -> (B, 1, height, width) canvas
    kernels centred on the origin (wrapped), ready for ``circular_filter``."""
    radius = small.shape[-1] // 2
    canvas = F.pad(small, (0, width - small.shape[-1], 0, height - small.shape[-2]))
    return torch.roll(canvas, shifts=(-radius, -radius), dims=(-2, -1))


def centred_grid(radius: int, device: torch.device, dtype=torch.float32):
    """Offsets (dy, dx) of a (2r+1) x (2r+1) kernel grid from its centre."""
    r = torch.arange(-radius, radius + 1, device=device, dtype=dtype)
    return r.view(1, 1, -1, 1), r.view(1, 1, 1, -1)


def pack_pairs(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) real -> (B, ceil(C/2), H, W) complex: channels 2k and 2k + 1 become
    the real and imaginary parts of plane k (a zero imaginary part for an odd last one).
    A real kernel keeps the two apart, so one complex FFT pair filters two channels and
    the slow real inverse transform is never needed."""
    images = images.float()
    imag = images[:, 1::2]
    if images.shape[1] % 2:
        imag = torch.cat((imag, torch.zeros_like(images[:, :1])), dim=1)
    return torch.complex(images[:, 0::2].contiguous(), imag.contiguous())


def unpack_pairs(planes: torch.Tensor, channels: int) -> torch.Tensor:
    """The inverse of ``pack_pairs`` (planes may be a cropped view)."""
    parts = torch.view_as_real(planes)
    batch, _, height, width = planes.shape
    out = torch.empty((batch, channels, height, width), dtype=torch.float32, device=planes.device)
    out[:, 0::2] = parts[..., 0]
    out[:, 1::2] = parts[:, : channels // 2, ..., 1]
    return out


def circular_filter(canvas: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Circular convolution of (B, 1, h, w) real canvases with per-sample (B, 1, h, w) kernels."""
    h, w = canvas.shape[-2:]
    spectrum = torch.fft.rfft2(canvas.float()).mul_(torch.fft.rfft2(kernels.float()))
    return torch.fft.irfft2(spectrum, s=(h, w))


def fft_filter(images: torch.Tensor, make_kernels, radius: int) -> torch.Tensor:
    """Filter (B, C, H, W) with per-sample kernels of support ``radius``, mirror borders.

    ``make_kernels(dy, dx)`` returns (B, 1, 2r+1, 2r+1) kernels on the offset grid.
    """
    _, channels, height, width = images.shape
    canvas_h, canvas_w = fast_len(height + 2 * radius), fast_len(width + 2 * radius)
    pad = (radius, canvas_w - width - radius, radius, canvas_h - height - radius)
    mode = "reflect" if max(pad) < min(height, width) else "replicate"
    padded = F.pad(pack_pairs(images), pad, mode=mode)
    kernels = embed_kernels(make_kernels(*centred_grid(radius, images.device)), canvas_h, canvas_w)
    spectrum = torch.fft.fft2(padded).mul_(torch.fft.fft2(kernels.to(padded.dtype)))
    planes = torch.fft.ifft2(spectrum)[..., radius : radius + height, radius : radius + width]
    return unpack_pairs(planes, channels).to(images.dtype)
