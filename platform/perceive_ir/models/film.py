"""PGM: prior-guided modulation, FiLM of a feature map from the prior [Z, F_l]."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["PriorFiLM"]


class PriorFiLM(nn.Module):
    """Y = X * gamma + beta with (gamma, beta) = MLP(prior).

    gamma is parameterised as 1 + delta and the last layer starts at zero, so an attached
    module starts as the identity and does not disturb a pretrained backbone.
    """

    def __init__(self, prior_dim: int, channels: int, hidden: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(prior_dim, hidden), nn.GELU(), nn.Linear(hidden, 2 * channels))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, x: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
        delta, beta = self.mlp(prior.to(x.dtype)).chunk(2, dim=-1)
        return x * (1 + delta[..., None, None]) + beta[..., None, None]
