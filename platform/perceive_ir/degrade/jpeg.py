"""JPEG compression with the real codec (libjpeg on the CPU, nvJPEG on CUDA)."""

from __future__ import annotations

import warnings
from typing import Mapping

import numpy as np
import torch

from .registry import Degradation, register
from .rng import SampleRNG


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    return images.clamp(0.0, 1.0).mul(255.0).round_().to(torch.uint8)


def _codec(batch: torch.Tensor, quality: int) -> list[torch.Tensor]:
    """Encode and decode a uint8 (n, 3, H, W) batch at one quality, on its device."""
    # Imported here: torchvision.io loads all of torchvision (1.5 s), which every process that
    # imports the degradations (evaluation actors, CLIs) would pay without ever compressing.
    from torchvision.io import decode_jpeg, encode_jpeg

    images = list(batch.unbind(0))
    with warnings.catch_warnings():
        # torchvision 0.29 announces a future move of its codecs to TorchCodec.
        warnings.simplefilter("ignore", DeprecationWarning)
        encoded = encode_jpeg(images, quality=quality)
        if batch.device.type == "cpu":
            return decode_jpeg(encoded)
        # nvJPEG decodes from host byte streams: only the small compressed files move.
        return decode_jpeg([e.cpu() for e in encoded], device=batch.device)


@register("jpeg")
class Jpeg(Degradation):
    """Baseline JPEG (4:2:0 chroma) at integer ``quality`` round(95 -> 10) with severity.
    Samples of equal quality are coded together in one call."""

    param_names = ("quality",)

    def params_at(self, severity: float, rng: np.random.Generator) -> dict[str, float]:
        return {"quality": float(round(95.0 - 85.0 * severity))}

    def apply(self, images: torch.Tensor, params: Mapping[str, torch.Tensor], rng: SampleRNG) -> torch.Tensor:
        as_bytes = to_uint8(images)
        out = torch.empty_like(as_bytes)
        qualities = params["quality"].round().to(torch.int64)
        for quality in torch.unique(qualities).tolist():
            index = (qualities == quality).nonzero().flatten()
            decoded = _codec(as_bytes.index_select(0, index), int(quality))
            out.index_copy_(0, index, torch.stack(decoded).to(out.device))
        return out.to(images.dtype).div_(255.0)
