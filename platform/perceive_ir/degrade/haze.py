"""Haze by the atmospheric scattering model I = J t + A (1 - t), t = exp(-beta d)."""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F

from .noise import per_sample
from .registry import Degradation, lerp, register
from .rng import SampleRNG

# Depth-like map in scene units: a top-to-bottom gradient (the top of a photo is usually
# farther) mixed with a smooth random field, mapped onto [DEPTH_NEAR, DEPTH_FAR]. With the
# method's beta range 0.04..0.2 this spans transmissions from about 0.96 down to 0.09.
DEPTH_NEAR, DEPTH_FAR = 1.0, 12.0
FIELD_CELLS = 5  # control points per side of the random field
GRADIENT_WEIGHT = 0.6


def _bicubic_weights(size: int, device: torch.device) -> torch.Tensor:
    """(size, FIELD_CELLS) weights of bicubic interpolation (corners aligned) in 1-D."""
    eye = torch.eye(FIELD_CELLS, device=device).view(FIELD_CELLS, 1, FIELD_CELLS, 1)
    columns = F.interpolate(eye, size=(size, 1), mode="bicubic", align_corners=True)
    return columns.view(FIELD_CELLS, size).t()


def depth_map(height: int, width: int, rng: SampleRNG, dtype=torch.float32) -> torch.Tensor:
    """(B, 1, H, W) depth, a function of the sample seed and the image size only."""
    field = rng.uniform((FIELD_CELLS, FIELD_CELLS), "depth")
    # Bicubic upsampling is separable: rows @ field @ columns^T, two small matmuls.
    rows_w = _bicubic_weights(height, field.device)
    cols_w = _bicubic_weights(width, field.device)
    smooth = (rows_w @ field @ cols_w.t()).clamp_(0.0, 1.0).unsqueeze(1)
    gradient = torch.linspace(1.0, 0.0, height, device=field.device).view(1, 1, height, 1)
    span = DEPTH_FAR - DEPTH_NEAR
    depth = smooth.mul_(span * (1.0 - GRADIENT_WEIGHT)).add_(gradient * (span * GRADIENT_WEIGHT) + DEPTH_NEAR)
    return depth.to(dtype)


def transmission(beta: torch.Tensor, height: int, width: int, rng: SampleRNG, dtype=torch.float32) -> torch.Tensor:
    """t = exp(-beta d) for (B,) beta; what ``Haze.apply`` uses for the same rng."""
    return depth_map(height, width, rng, dtype).mul_(-per_sample(beta).to(dtype)).exp_()


@register("haze")
class Haze(Degradation):
    """Scattering coefficient ``beta`` 0.04 -> 0.2 and airlight ``airlight`` 0.8 -> 1.0
    (grey) with severity; the depth map is the sample's smooth random field."""

    param_names = ("beta", "airlight")

    def params_at(self, severity: float, rng: np.random.Generator) -> dict[str, float]:
        return {"beta": lerp(0.04, 0.2, severity), "airlight": lerp(0.8, 1.0, severity)}

    def apply(self, images: torch.Tensor, params: Mapping[str, torch.Tensor], rng: SampleRNG) -> torch.Tensor:
        t = transmission(params["beta"], images.shape[-2], images.shape[-1], rng, images.dtype)
        airlight = per_sample(params["airlight"]).to(images.dtype)
        # J t + A (1 - t), written as A + (J - A) t
        return torch.addcmul(airlight, images - airlight, t).clamp_(0.0, 1.0)
