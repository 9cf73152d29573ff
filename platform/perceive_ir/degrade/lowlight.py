"""Low light: (gain x)^gamma, then signal-dependent sensor noise."""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

from .noise import per_sample, signal_dependent_noise
from .registry import Degradation, lerp, register
from .rng import SampleRNG


@register("low_light")
class LowLight(Degradation):
    """``gain`` 0.8 -> 0.2 (below 1) and ``gamma`` 1.2 -> 2.2 (above 1) darken the image;
    then shot noise of a sensor with ``peak`` photons at white (10**3.3 -> 10**2) and
    read noise ``read_sigma`` 1 -> 8 (0-255 scale), all with severity."""

    pointwise = True
    param_names = ("gain", "gamma", "peak", "read_sigma")

    def params_at(self, severity: float, rng: np.random.Generator) -> dict[str, float]:
        return {
            "gain": lerp(0.8, 0.2, severity),
            "gamma": lerp(1.2, 2.2, severity),
            "peak": 10.0 ** lerp(3.3, 2.0, severity),
            "read_sigma": lerp(1.0, 8.0, severity),
        }

    def apply(self, images: torch.Tensor, params: Mapping[str, torch.Tensor], rng: SampleRNG) -> torch.Tensor:
        gain = per_sample(params["gain"]).to(images.dtype)
        gamma = per_sample(params["gamma"]).to(images.dtype)
        # (gain x)^gamma as exp(gamma log(gain x)): a per-sample exponent makes pow() a
        # scalar loop on CPUs, log/exp are vectorised; log(0) = -inf gives exp(-inf) = 0.
        dark = images.clamp(min=0.0).mul_(gain).log_().mul_(gamma).exp_()
        noisy = signal_dependent_noise(dark, params["peak"], params["read_sigma"] / 255.0, rng)
        return noisy.clamp_(0.0, 1.0)
