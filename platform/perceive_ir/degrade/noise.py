"""Additive white Gaussian noise and signal-dependent (Poisson-Gaussian) noise."""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

from .registry import Degradation, lerp, register
from .rng import SampleRNG

MAX_SIGMA = 75.0  # 0-255 scale at severity 1


def per_sample(values: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1, 1) for broadcasting over C x H x W."""
    return values.view(-1, 1, 1, 1)


def standard_normal_like(images: torch.Tensor, rng: SampleRNG, draw: str = "noise") -> torch.Tensor:
    return rng.normal(images.shape[1:], draw).to(images.dtype)


def signal_dependent_noise(
    images: torch.Tensor, peak: torch.Tensor, read_sigma: torch.Tensor, rng: SampleRNG
) -> torch.Tensor:
    """x + sqrt(x / peak + read_sigma**2) * n: the heteroscedastic Gaussian form of
    Poisson(peak * x) / peak plus Gaussian read noise (read_sigma on the [0, 1] scale)."""
    noise = standard_normal_like(images, rng)
    inverse_peak = per_sample(1.0 / peak).to(images.dtype)
    read_variance = per_sample(read_sigma**2).to(images.dtype)
    std = torch.addcmul(read_variance, images.clamp(min=0), inverse_peak).sqrt_()
    return torch.addcmul(images, std, noise)


@register("gaussian_noise")
class GaussianNoise(Degradation):
    """x + sigma / 255 * n, n ~ N(0, 1), then clamped to [0, 1]; sigma = 75 * severity."""

    pointwise = True
    param_names = ("sigma",)
    extra_levels = {"sigma15": 15 / MAX_SIGMA, "sigma25": 25 / MAX_SIGMA, "sigma50": 50 / MAX_SIGMA}
    level_params = {"sigma15": {"sigma": 15.0}, "sigma25": {"sigma": 25.0}, "sigma50": {"sigma": 50.0}}

    def params_at(self, severity: float, rng: np.random.Generator) -> dict[str, float]:
        return {"sigma": MAX_SIGMA * severity}

    def apply(self, images: torch.Tensor, params: Mapping[str, torch.Tensor], rng: SampleRNG) -> torch.Tensor:
        noise = standard_normal_like(images, rng)
        sigma = per_sample(params["sigma"] / 255.0).to(images.dtype)
        return torch.addcmul(images, noise, sigma).clamp_(0.0, 1.0)


@register("poisson_gaussian_noise")
class PoissonGaussianNoise(Degradation):
    """Shot noise of a sensor whose white level collects ``peak`` photons, plus read noise
    ``read_sigma`` (0-255 scale). peak falls log-linearly 1000 -> 10, read_sigma 2 -> 20."""

    pointwise = True
    param_names = ("peak", "read_sigma")

    def params_at(self, severity: float, rng: np.random.Generator) -> dict[str, float]:
        return {"peak": 10.0 ** lerp(3.0, 1.0, severity), "read_sigma": lerp(2.0, 20.0, severity)}

    def apply(self, images: torch.Tensor, params: Mapping[str, torch.Tensor], rng: SampleRNG) -> torch.Tensor:
        noisy = signal_dependent_noise(images, params["peak"], params["read_sigma"] / 255.0, rng)
        return noisy.clamp_(0.0, 1.0)


__all__ = ["GaussianNoise", "PoissonGaussianNoise", "signal_dependent_noise", "per_sample", "MAX_SIGMA"]
