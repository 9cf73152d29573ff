"""Rain streaks: sparse drops smeared by a line kernel, screen-blended over the image."""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np
import torch

from .kernels import circular_filter, line_kernel, wrapped_grid
from .noise import per_sample
from .registry import Degradation, lerp, register
from .rng import SampleRNG

MAX_LENGTH = 55.0
MAX_ANGLE = 60.0  # degrees either side of vertical
# Drops are laid on a canvas larger than the image by this margin, so streaks enter from
# outside the frame and the circular FFT never wraps a streak into the image.
CANVAS_MARGIN = 64


@register("rain")
class Rain(Degradation):
    """Drop ``density`` (fraction of pixels seeding a streak) 0.001 -> 0.008, streak
    ``length`` 10 -> 55 px, ``width`` 1 -> 2 px, layer ``brightness`` 0.5 -> 0.9 with
    severity; the ``angle`` (degrees from vertical, +-60) is a nuisance. Every drop that
    falls at a lower severity is still there at a higher one, so rain only accumulates."""

    param_names = ("density", "length", "angle", "width", "brightness")

    def params_at(self, severity: float, rng: np.random.Generator) -> dict[str, float]:
        return {
            "density": lerp(0.001, 0.008, severity),
            "length": lerp(10.0, MAX_LENGTH, severity),
            "angle": float(rng.uniform(-MAX_ANGLE, MAX_ANGLE)),
            "width": lerp(1.0, 2.0, severity),
            "brightness": lerp(0.5, 0.9, severity),
        }

    def layer(self, height: int, width: int, params: Mapping[str, torch.Tensor], rng: SampleRNG) -> torch.Tensor:
        """The (B, 1, H, W) rain layer in [0, brightness]."""
        canvas_h, canvas_w = height + CANVAS_MARGIN, width + CANVAS_MARGIN
        u = rng.uniform((1, canvas_h, canvas_w), "drops")
        density = per_sample(params["density"])
        # Seeds where u < density, stronger the further below the threshold.
        drops = torch.where(u < density, 1.0 - 0.5 * u / density, torch.zeros_like(u))
        dy, dx = wrapped_grid(canvas_h, canvas_w, u.device)
        direction = math.pi / 2 - torch.deg2rad(params["angle"])
        kernels = line_kernel(params["length"], direction, params["width"], dy, dx)
        streaks = circular_filter(drops, kernels).clamp_(0.0, 1.0)
        top = left = CANVAS_MARGIN // 2
        return streaks[..., top : top + height, left : left + width] * per_sample(params["brightness"])

    def apply(self, images: torch.Tensor, params: Mapping[str, torch.Tensor], rng: SampleRNG) -> torch.Tensor:
        rain = self.layer(images.shape[-2], images.shape[-1], params, rng).to(images.dtype)
        return (images + rain * (1.0 - images)).clamp_(0.0, 1.0)
