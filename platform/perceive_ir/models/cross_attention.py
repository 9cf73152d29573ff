"""PGCA: prior-guided cross-attention, queries from the modulated feature, keys/values from the decoder feature."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from perceive_ir.models.layers import ChannelLayerNorm

__all__ = ["PriorCrossAttention"]


class PriorCrossAttention(nn.Module):
    """Transposed (channel) cross-attention, linear in the number of pixels.

    Attention over channels rather than pixels keeps the cost of full-resolution decoder levels
    affordable (a pixel-wise attention at 256 x 256 would need a 65536^2 map).
    """

    def __init__(self, channels: int, heads: int = 1) -> None:
        super().__init__()
        heads = heads if channels % heads == 0 else 1
        self.heads = heads
        self.norm_q = ChannelLayerNorm(channels)
        self.norm_kv = ChannelLayerNorm(channels)
        self.temperature = nn.Parameter(torch.ones(heads, 1, 1))
        self.q = nn.Sequential(
            nn.Conv2d(channels, channels, 1, bias=False),
            nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False),
        )
        self.kv = nn.Sequential(
            nn.Conv2d(channels, 2 * channels, 1, bias=False),
            nn.Conv2d(2 * channels, 2 * channels, 3, padding=1, groups=2 * channels, bias=False),
        )
        self.project = nn.Conv2d(channels, channels, 1, bias=False)

    def forward(self, modulated: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
        b, c, h, w = feature.shape
        q = self.q(self.norm_q(modulated)).reshape(b, self.heads, c // self.heads, h * w)
        k, v = self.kv(self.norm_kv(feature)).chunk(2, dim=1)
        k = k.reshape(b, self.heads, c // self.heads, h * w)
        v = v.reshape(b, self.heads, c // self.heads, h * w)
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        attn = (q @ k.transpose(-2, -1) * self.temperature).softmax(dim=-1)
        return feature + self.project((attn @ v).reshape(b, c, h, w))
