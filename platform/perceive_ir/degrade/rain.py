"""Rain streaks: sparse drops smeared by a line kernel, screen-blended over the image."""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np
import torch

from .kernels import centred_grid, circular_filter, embed_kernels, line_kernel
from .noise import per_sample
from .registry import Degradation, lerp, register
from .rng import SampleRNG

MAX_LENGTH = 55.0
MAX_ANGLE = 60.0  # degrees either side of vertical
MAX_DENSITY = 0.008
# Drops are laid on a canvas larger than the image by this margin, so streaks enter from
# outside the frame and the circular FFT never wraps a streak into the image.
CANVAS_MARGIN = 64
KERNEL_RADIUS = 30  # holds a 55 px streak of width 2 at any angle


def drop_canvas(height: int, width: int, density: torch.Tensor, rng: SampleRNG) -> torch.Tensor:
    """(B, 1, height, width) drops: value 1 - u / (2 density) where u < density, else 0.

    Rather than one uniform per pixel, each sample draws MAX_DENSITY x area candidate
    drops (a position and a u in [0, MAX_DENSITY)); those with u < density fall. The
    same candidates serve every density, so drops only accumulate with severity.
    """
    area = height * width
    count = max(1, math.ceil(MAX_DENSITY * area))
    draws = rng.uniform((2, count), "drops")
    position = (draws[:, 0] * area).long().clamp_(max=area - 1)
    u = draws[:, 1] * MAX_DENSITY
    density = density.view(-1, 1)
    value = torch.where(u < density, 1.0 - 0.5 * u / density, torch.zeros_like(u))
    canvas = torch.zeros(len(rng), area, device=draws.device)
    # amax keeps the result independent of the order in which duplicates land.
    canvas.scatter_reduce_(1, position, value, reduce="amax")
    return canvas.view(-1, 1, height, width)


@register("rain")
class Rain(Degradation):
    """Drop ``density`` (fraction of pixels seeding a streak) 0.001 -> 0.008, streak
    ``length`` 10 -> 55 px, ``width`` 1 -> 2 px, layer ``brightness`` 0.5 -> 0.9 with
    severity; the ``angle`` (degrees from vertical, +-60) is a nuisance. Every drop that
    falls at a lower severity is still there at a higher one, so rain only accumulates."""

    param_names = ("density", "length", "angle", "width", "brightness")

    def params_at(self, severity: float, rng: np.random.Generator) -> dict[str, float]:
        return {
            "density": lerp(0.001, MAX_DENSITY, severity),
            "length": lerp(10.0, MAX_LENGTH, severity),
            "angle": float(rng.uniform(-MAX_ANGLE, MAX_ANGLE)),
            "width": lerp(1.0, 2.0, severity),
            "brightness": lerp(0.5, 0.9, severity),
        }

    def layer(self, height: int, width: int, params: Mapping[str, torch.Tensor], rng: SampleRNG) -> torch.Tensor:
        """The (B, 1, H, W) rain layer in [0, brightness]."""
        canvas_h, canvas_w = height + CANVAS_MARGIN, width + CANVAS_MARGIN
        drops = drop_canvas(canvas_h, canvas_w, params["density"].clamp(max=MAX_DENSITY), rng)
        direction = math.pi / 2 - torch.deg2rad(params["angle"])
        dy, dx = centred_grid(KERNEL_RADIUS, drops.device)
        kernels = line_kernel(params["length"], direction, params["width"], dy, dx)
        streaks = circular_filter(drops, embed_kernels(kernels, canvas_h, canvas_w)).clamp_(0.0, 1.0)
        top = left = CANVAS_MARGIN // 2
        return streaks[..., top : top + height, left : left + width] * per_sample(params["brightness"])

    def apply(self, images: torch.Tensor, params: Mapping[str, torch.Tensor], rng: SampleRNG) -> torch.Tensor:
        rain = self.layer(images.shape[-2], images.shape[-1], params, rng).to(images.dtype)
        return (images + rain * (1.0 - images)).clamp_(0.0, 1.0)
