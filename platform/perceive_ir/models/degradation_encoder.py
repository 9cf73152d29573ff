"""CFE: the compact degradation encoder, degraded image -> L2-normalised degradation code Z."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CompactDegradationEncoder"]


class CompactDegradationEncoder(nn.Module):
    """Stride-2 convolutions, global average pooling and a linear layer (reference: 4 convs, 128-d)."""

    def __init__(self, widths: list[int], code_dim: int = 128, in_channels: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        prev = in_channels
        for width in widths:
            layers += [nn.Conv2d(prev, width, 3, stride=2, padding=1), nn.LeakyReLU(0.1, inplace=True)]
            prev = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(prev, code_dim)
        self.code_dim = code_dim

    def forward(self, degraded: torch.Tensor) -> torch.Tensor:
        pooled = self.features(degraded).mean(dim=(-2, -1))
        return F.normalize(self.head(pooled), dim=-1)
