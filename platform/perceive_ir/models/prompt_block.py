"""PromptIR-style prompt generation: a learned prompt set mixed by weights predicted from the feature."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PromptGenerationBlock"]


class PromptGenerationBlock(nn.Module):
    """Produces a ``prompt_dim`` x H x W prompt from a feature map.

    ``prompt_len`` learned prompt components (each prompt_dim x size x size) are combined with
    softmax weights predicted from the globally pooled feature, resized to the feature's
    resolution and refined by a 3x3 convolution.
    """

    def __init__(self, feature_dim: int, prompt_dim: int, prompt_len: int = 5, prompt_size: int = 16) -> None:
        super().__init__()
        self.components = nn.Parameter(torch.rand(prompt_len, prompt_dim, prompt_size, prompt_size))
        self.weights = nn.Linear(feature_dim, prompt_len)
        self.refine = nn.Conv2d(prompt_dim, prompt_dim, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mix = self.weights(x.mean(dim=(-2, -1))).softmax(dim=-1)  # B x L
        prompt = torch.einsum("bl,lchw->bchw", mix, self.components)
        prompt = F.interpolate(prompt, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.refine(prompt)
