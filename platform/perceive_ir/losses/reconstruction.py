"""L_rec: L1 between the restored image and the ground truth (in fp32, whatever the images' dtype)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from perceive_ir.models.precision import at_least_fp32

__all__ = ["ReconstructionLoss"]


class ReconstructionLoss(nn.Module):
    def forward(self, restored: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.l1_loss(at_least_fp32(restored), at_least_fp32(target))
