"""NAFNet: a nonlinear-activation-free U-Net restorer.

Blocks use a simple gate (split channels in two halves and multiply) instead of activations, and
simplified channel attention (global pooling then a 1x1 convolution). Encoder levels halve the
resolution with a stride-2 convolution and double the width; decoder levels upsample with a 1x1
convolution and pixel shuffle and add the skip connection.

Interface shared by all backbones: ``restored = net(degraded, cond)``; ``cond`` is ignored here.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from perceive_ir.models.layers import ChannelLayerNorm, pad_to_multiple

__all__ = ["NAFNetConfig", "NAFNet"]


@dataclasses.dataclass
class NAFNetConfig:
    in_channels: int = 3
    out_channels: int = 3
    width: int = 32
    encoder_blocks: list[int] = dataclasses.field(default_factory=lambda: [2, 2, 4, 8])
    middle_blocks: int = 12
    decoder_blocks: list[int] = dataclasses.field(default_factory=lambda: [2, 2, 2, 2])
    expansion: int = 2
    ffn_expansion: int = 2

    def __post_init__(self) -> None:
        if len(self.encoder_blocks) != len(self.decoder_blocks):
            raise ValueError("encoder_blocks and decoder_blocks need the same number of levels")

    def build(self) -> "NAFNet":
        return NAFNet(self)


class SimpleGate(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, dim=1)
        return a * b


class NAFBlock(nn.Module):
    def __init__(self, c: int, expansion: int = 2, ffn_expansion: int = 2) -> None:
        super().__init__()
        hidden = c * expansion
        self.norm1 = ChannelLayerNorm(c)
        self.expand = nn.Conv2d(c, hidden, 1)
        self.dw = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.gate = SimpleGate()
        self.channel_attention = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(hidden // 2, hidden // 2, 1))
        self.project = nn.Conv2d(hidden // 2, c, 1)
        self.norm2 = ChannelLayerNorm(c)
        self.ffn_in = nn.Conv2d(c, c * ffn_expansion, 1)
        self.ffn_out = nn.Conv2d(c * ffn_expansion // 2, c, 1)
        # per-channel residual scales start at zero: each block starts as the identity
        self.beta = nn.Parameter(torch.zeros(1, c, 1, 1))
        self.gamma = nn.Parameter(torch.zeros(1, c, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.gate(self.dw(self.expand(self.norm1(x))))
        y = self.project(y * self.channel_attention(y))
        x = x + y * self.beta
        y = self.ffn_out(self.gate(self.ffn_in(self.norm2(x))))
        return x + y * self.gamma


class NAFNet(nn.Module):
    def __init__(self, cfg: NAFNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        c = cfg.width
        self.intro = nn.Conv2d(cfg.in_channels, c, 3, padding=1)
        self.encoders, self.downs = nn.ModuleList(), nn.ModuleList()
        widths = []
        for n in cfg.encoder_blocks:
            self.encoders.append(nn.Sequential(*[NAFBlock(c, cfg.expansion, cfg.ffn_expansion) for _ in range(n)]))
            self.downs.append(nn.Conv2d(c, c * 2, 2, stride=2))
            widths.append(c)
            c *= 2
        self.middle = nn.Sequential(*[NAFBlock(c, cfg.expansion, cfg.ffn_expansion) for _ in range(cfg.middle_blocks)])
        self.ups, self.decoders = nn.ModuleList(), nn.ModuleList()
        for n, skip_width in zip(cfg.decoder_blocks, reversed(widths)):
            self.ups.append(nn.Sequential(nn.Conv2d(c, c * 2, 1, bias=False), nn.PixelShuffle(2)))
            c //= 2
            self.decoders.append(
                nn.Sequential(*[NAFBlock(skip_width, cfg.expansion, cfg.ffn_expansion) for _ in range(n)])
            )
        self.ending = nn.Conv2d(cfg.width, cfg.out_channels, 3, padding=1)
        # With the global skip the network starts as input + (almost) 0: training learns a residual and
        # cannot start below its input. Not exactly 0, so that every layer gets a gradient from step one.
        with torch.no_grad():
            self.ending.weight.mul_(1e-3)
            if self.ending.bias is not None:
                self.ending.bias.zero_()
        self._multiple = 2 ** len(cfg.encoder_blocks)

    def decoder_stages(self) -> list[tuple[str, int]]:
        """(submodule name, output channels) of each decoder level, deepest first."""
        levels = len(self.cfg.encoder_blocks)
        stages = [("middle", self.cfg.width * 2**levels)]
        stages += [(f"decoders.{i}", self.cfg.width * 2 ** (levels - 1 - i)) for i in range(levels)]
        return stages

    def forward(self, degraded: torch.Tensor, cond: object = None) -> torch.Tensor:
        x, (h, w) = pad_to_multiple(degraded, self._multiple)
        feat = self.intro(x)
        skips = []
        for encoder, down in zip(self.encoders, self.downs):
            feat = encoder(feat)
            skips.append(feat)
            feat = down(feat)
        feat = self.middle(feat)
        for up, decoder, skip in zip(self.ups, self.decoders, reversed(skips)):
            feat = decoder(up(feat) + skip)
        out = self.ending(feat) + x[:, : self.cfg.out_channels]
        return out[..., :h, :w]
