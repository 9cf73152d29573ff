"""Restormer / PromptIR-style U-Net restorer.

Four levels of transformer blocks made of multi-Dconv-head transposed attention (attention
across channels, so cost grows linearly with the number of pixels) and a gated depthwise-conv
feed-forward network. With ``prompts=True`` the decoder gets PromptIR's prompt blocks: at the
latent and at decoder levels 3 and 2, a generated prompt is concatenated to the feature, mixed
by one transformer block and reduced back to the feature width.

Interface shared by all backbones: ``restored = net(degraded, cond)``; ``cond`` is ignored
here (conditioning attaches from outside through :meth:`decoder_stages`).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from perceive_ir.models.layers import ChannelLayerNorm, pad_to_multiple
from perceive_ir.models.prompt_block import PromptGenerationBlock

__all__ = ["RestormerConfig", "Restormer"]


@dataclasses.dataclass
class RestormerConfig:
    """Sizes of the U-Net. Defaults: the paper's (PromptIR) network."""

    in_channels: int = 3
    out_channels: int = 3
    dim: int = 48
    blocks: list[int] = dataclasses.field(default_factory=lambda: [4, 6, 6, 8])
    heads: list[int] = dataclasses.field(default_factory=lambda: [1, 2, 4, 8])
    refinement_blocks: int = 4
    ffn_expansion: float = 2.66
    bias: bool = False
    prompts: bool = True
    prompt_len: int = 5
    # prompt widths at (level 1, level 2, level 3) = PromptIR's (64, 128, 320) for dim 48
    prompt_dims: list[int] = dataclasses.field(default_factory=lambda: [64, 128, 320])
    prompt_sizes: list[int] = dataclasses.field(default_factory=lambda: [64, 32, 16])

    def __post_init__(self) -> None:
        if len(self.blocks) != 4 or len(self.heads) != 4:
            raise ValueError("blocks and heads need one entry per level (4)")
        for level, heads in enumerate(self.heads):
            width = self.dim * 2**level if level < 3 else self.dim * 8
            if width % heads:
                raise ValueError(f"level {level + 1}: width {width} is not divisible by {heads} heads")
        if len(self.prompt_dims) != 3 or len(self.prompt_sizes) != 3:
            raise ValueError("prompt_dims and prompt_sizes need 3 entries (levels 1-3)")
        if self.prompts:
            # prompt stage at level l mixes [feature of level l+1, prompt] with the heads of level l
            for level in range(3):
                width = self.dim * 2 ** (level + 1) + self.prompt_dims[level]
                if width % self.heads[level]:
                    raise ValueError(f"prompt stage {level + 1}: width {width} not divisible by {self.heads[level]} heads")

    def build(self) -> "Restormer":
        return Restormer(self)


class TransposedAttention(nn.Module):
    """Multi-Dconv head transposed attention: a C/h x C/h attention map per head."""

    def __init__(self, dim: int, heads: int, bias: bool) -> None:
        super().__init__()
        self.heads = heads
        self.temperature = nn.Parameter(torch.ones(heads, 1, 1))
        self.qkv = nn.Conv2d(dim, dim * 3, 1, bias=bias)
        self.qkv_dw = nn.Conv2d(dim * 3, dim * 3, 3, padding=1, groups=dim * 3, bias=bias)
        self.project = nn.Conv2d(dim, dim, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv_dw(self.qkv(x)).chunk(3, dim=1)
        q, k, v = (t.reshape(b, self.heads, c // self.heads, h * w) for t in (q, k, v))
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        attn = (q @ k.transpose(-2, -1) * self.temperature).softmax(dim=-1)
        return self.project((attn @ v).reshape(b, c, h, w))


class GatedFeedForward(nn.Module):
    """Gated depthwise-conv feed-forward: GELU(a) * b over two depthwise-filtered branches."""

    def __init__(self, dim: int, expansion: float, bias: bool) -> None:
        super().__init__()
        hidden = int(dim * expansion)
        self.project_in = nn.Conv2d(dim, hidden * 2, 1, bias=bias)
        self.dw = nn.Conv2d(hidden * 2, hidden * 2, 3, padding=1, groups=hidden * 2, bias=bias)
        self.project_out = nn.Conv2d(hidden, dim, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.dw(self.project_in(x)).chunk(2, dim=1)
        return self.project_out(F.gelu(gate) * value)


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, expansion: float, bias: bool) -> None:
        super().__init__()
        self.norm1 = ChannelLayerNorm(dim)
        self.attn = TransposedAttention(dim, heads, bias)
        self.norm2 = ChannelLayerNorm(dim)
        self.ffn = GatedFeedForward(dim, expansion, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))


def _stack(n: int, dim: int, heads: int, cfg: RestormerConfig) -> nn.Sequential:
    return nn.Sequential(*[TransformerBlock(dim, heads, cfg.ffn_expansion, cfg.bias) for _ in range(n)])


class Downsample(nn.Sequential):
    def __init__(self, dim: int) -> None:
        super().__init__(nn.Conv2d(dim, dim // 2, 3, padding=1, bias=False), nn.PixelUnshuffle(2))


class Upsample(nn.Sequential):
    def __init__(self, dim: int) -> None:
        super().__init__(nn.Conv2d(dim, dim * 2, 3, padding=1, bias=False), nn.PixelShuffle(2))


class PromptStage(nn.Module):
    """PromptIR decoder step: feature -> [feature, prompt] -> transformer block -> 1x1 back to width."""

    def __init__(self, dim: int, prompt_dim: int, prompt_size: int, heads: int, cfg: RestormerConfig) -> None:
        super().__init__()
        self.prompt = PromptGenerationBlock(dim, prompt_dim, cfg.prompt_len, prompt_size)
        self.mix = TransformerBlock(dim + prompt_dim, heads, cfg.ffn_expansion, cfg.bias)
        self.reduce = nn.Conv2d(dim + prompt_dim, dim, 1, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reduce(self.mix(torch.cat([x, self.prompt(x)], dim=1)))


class Restormer(nn.Module):
    def __init__(self, cfg: RestormerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        widths = [d, d * 2, d * 4, d * 8]
        self.embed = nn.Conv2d(cfg.in_channels, d, 3, padding=1, bias=cfg.bias)
        self.encoder1 = _stack(cfg.blocks[0], widths[0], cfg.heads[0], cfg)
        self.down1 = Downsample(widths[0])
        self.encoder2 = _stack(cfg.blocks[1], widths[1], cfg.heads[1], cfg)
        self.down2 = Downsample(widths[1])
        self.encoder3 = _stack(cfg.blocks[2], widths[2], cfg.heads[2], cfg)
        self.down3 = Downsample(widths[2])
        self.latent = _stack(cfg.blocks[3], widths[3], cfg.heads[3], cfg)

        if cfg.prompts:
            self.prompt3 = PromptStage(widths[3], cfg.prompt_dims[2], cfg.prompt_sizes[2], cfg.heads[2], cfg)
            self.prompt2 = PromptStage(widths[2], cfg.prompt_dims[1], cfg.prompt_sizes[1], cfg.heads[1], cfg)
            self.prompt1 = PromptStage(widths[1], cfg.prompt_dims[0], cfg.prompt_sizes[0], cfg.heads[0], cfg)
        else:
            self.prompt3 = self.prompt2 = self.prompt1 = nn.Identity()

        self.up3 = Upsample(widths[3])
        self.reduce3 = nn.Conv2d(widths[3], widths[2], 1, bias=cfg.bias)
        self.decoder3 = _stack(cfg.blocks[2], widths[2], cfg.heads[2], cfg)
        self.up2 = Upsample(widths[2])
        self.reduce2 = nn.Conv2d(widths[2], widths[1], 1, bias=cfg.bias)
        self.decoder2 = _stack(cfg.blocks[1], widths[1], cfg.heads[1], cfg)
        self.up1 = Upsample(widths[1])
        # level 1 keeps the concatenated width (2 * dim), as in Restormer
        self.decoder1 = _stack(cfg.blocks[0], widths[1], cfg.heads[0], cfg)
        self.refinement = _stack(cfg.refinement_blocks, widths[1], cfg.heads[0], cfg)
        self.output = nn.Conv2d(widths[1], cfg.out_channels, 3, padding=1, bias=cfg.bias)
        # With the global skip the network starts as input + (almost) 0: training learns a residual and
        # cannot start below its input. Not exactly 0, so that every layer gets a gradient from step one.
        with torch.no_grad():
            self.output.weight.mul_(1e-3)
            if self.output.bias is not None:
                self.output.bias.zero_()

    def decoder_stages(self) -> list[tuple[str, int]]:
        """(submodule name, output channels) of each decoder level, deepest first.

        Conditioning modules attach to these outputs with forward hooks.
        """
        d = self.cfg.dim
        return [("latent", d * 8), ("decoder3", d * 4), ("decoder2", d * 2), ("decoder1", d * 2)]

    def forward(self, degraded: torch.Tensor, cond: object = None) -> torch.Tensor:
        x, (h, w) = pad_to_multiple(degraded, 8)
        e1 = self.encoder1(self.embed(x))
        e2 = self.encoder2(self.down1(e1))
        e3 = self.encoder3(self.down2(e2))
        z = self.latent(self.down3(e3))
        z = self.prompt3(z)
        d3 = self.decoder3(self.reduce3(torch.cat([self.up3(z), e3], dim=1)))
        d3 = self.prompt2(d3)
        d2 = self.decoder2(self.reduce2(torch.cat([self.up2(d3), e2], dim=1)))
        d2 = self.prompt1(d2)
        d1 = self.decoder1(torch.cat([self.up1(d2), e1], dim=1))
        out = self.output(self.refinement(d1)) + x[:, : self.cfg.out_channels]
        return out[..., :h, :w]
