"""Gaussian blur (isotropic and anisotropic kernels) and linear motion blur."""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np
import torch

from .kernels import fft_filter, gaussian_kernel, line_kernel
from .registry import Degradation, lerp, register
from .rng import SampleRNG

MAX_KERNEL = 21  # kernel sizes 7..21, as in the method's recipe
MAX_MOTION_LENGTH = 21.0


def odd_size(sigma: float) -> int:
    """A kernel covering +-3 sigma, odd, within 7..MAX_KERNEL."""
    return int(min(MAX_KERNEL, max(7, 2 * math.ceil(3.0 * sigma) + 1)))


@register("gaussian_blur")
class GaussianBlur(Degradation):
    """Gaussian kernel, major-axis sigma 0.2 -> 3.0 px with severity. Half the samples
    are isotropic; the others are anisotropic with a random minor/major ratio in
    [0.3, 0.9] and a random orientation (nuisances, fixed by the sample's seed)."""

    param_names = ("sigma_major", "sigma_minor", "theta", "size")

    def params_at(self, severity: float, rng: np.random.Generator) -> dict[str, float]:
        major = lerp(0.2, 3.0, severity)
        isotropic = rng.random() < 0.5
        ratio = 1.0 if isotropic else float(rng.uniform(0.3, 0.9))
        theta = 0.0 if isotropic else float(rng.uniform(0.0, math.pi))
        return {"sigma_major": major, "sigma_minor": major * ratio, "theta": theta, "size": float(odd_size(major))}

    def apply(self, images: torch.Tensor, params: Mapping[str, torch.Tensor], rng: SampleRNG) -> torch.Tensor:
        def kernels(dy, dx):
            return gaussian_kernel(params["sigma_major"], params["sigma_minor"], params["theta"], params["size"], dy, dx)

        return fft_filter(images, kernels, MAX_KERNEL // 2).clamp_(0.0, 1.0)


@register("motion_blur")
class MotionBlur(Degradation):
    """Uniform linear motion: a 1 px wide segment of ``length`` 5 -> 21 px with
    severity, at a random angle in [0, pi)."""

    param_names = ("length", "angle")

    def params_at(self, severity: float, rng: np.random.Generator) -> dict[str, float]:
        return {"length": lerp(5.0, MAX_MOTION_LENGTH, severity), "angle": float(rng.uniform(0.0, math.pi))}

    def apply(self, images: torch.Tensor, params: Mapping[str, torch.Tensor], rng: SampleRNG) -> torch.Tensor:
        def kernels(dy, dx):
            weights = line_kernel(params["length"], params["angle"], torch.ones_like(params["length"]), dy, dx)
            return weights / weights.sum(dim=(-2, -1), keepdim=True)

        radius = int(math.ceil(MAX_MOTION_LENGTH / 2)) + 1
        return fft_filter(images, kernels, radius).clamp_(0.0, 1.0)
