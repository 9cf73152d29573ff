"""L_rec: L1 between the restored image and the ground truth."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ReconstructionLoss"]


class ReconstructionLoss(nn.Module):
    def forward(self, restored: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.l1_loss(restored, target)
