"""L_clip: 1 - p(excellent) of the restored image under the frozen stage-1 perceiver.

The perceiver's CLIP towers stay fp32 under a bf16 trainer and compute the probabilities in fp32
(``models.precision``): the loss is an fp32 scalar whatever the dtype of the restored image."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

__all__ = ["ClipQualityConfig", "ClipQualityLoss"]


@dataclasses.dataclass
class ClipQualityConfig:
    # reference: softmax over raw cosines, without CLIP's logit scale (verify)
    use_logit_scale: bool = False


class ClipQualityLoss(nn.Module):
    """Gradients reach the restored image through the frozen perceiver; the perceiver gets none."""

    def __init__(self, perceiver: nn.Module, cfg: ClipQualityConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg or ClipQualityConfig()
        self.perceiver = perceiver.requires_grad_(False)

    def forward(self, restored: torch.Tensor) -> torch.Tensor:
        probs = self.perceiver.tier_probs(restored.float().clamp(0, 1), use_logit_scale=self.cfg.use_logit_scale)
        return (1 - probs[:, -1].float()).mean()
