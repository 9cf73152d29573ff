"""L_dpl: difficulty-adaptive perceptual loss, a contrastive ratio in frozen VGG-16 features.

    L = mean_b sum_l w_l * D_l(R_b, G_b) / (sum_n a_{n,b} * D_l(R_b, N_{n,b}) + eps)

with D_l the mean absolute difference of layer-l features, R the restored image (anchor), G the
ground truth (positive) and N_n the negatives: the degraded input (easy) and the medium-tier
outputs (hard). The difficulty weight a_{n,b} comes from the perceiver: each negative gets a
quality score s; with ``difficulty_reference: relative`` s is taken minus the current output's
score. Thresholds t_1 < ... < t_{T-1} split scores into T tiers (tier = number of thresholds <= s)
and tier k weighs ``tier_weights[k]``. The reference rule (1.25 for a negative at least as good as
the current output, else 0.75) is ``relative`` with thresholds [0.0] and weights [0.75, 1.25].
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Sequence

import torch
from torch import nn

from perceive_ir.models.vgg_features import VGGConfig, VGGFeatures

__all__ = ["PerceptualConfig", "DifficultyAdaptivePerceptualLoss", "difficulty_weights"]


@dataclasses.dataclass
class PerceptualConfig:
    vgg: VGGConfig = dataclasses.field(default_factory=VGGConfig)
    layer_weights: list[float] = dataclasses.field(default_factory=lambda: [1 / 12, 1 / 6, 1 / 3, 1.0])
    tier_thresholds: list[float] = dataclasses.field(default_factory=lambda: [1 / 3, 2 / 3])
    tier_weights: list[float] = dataclasses.field(default_factory=lambda: [0.75, 1.0, 1.25])
    difficulty_reference: Literal["absolute", "relative"] = "absolute"
    eps: float = 1e-7

    def __post_init__(self) -> None:
        if len(self.layer_weights) != len(self.vgg.layers):
            raise ValueError(f"{len(self.layer_weights)} layer_weights for {len(self.vgg.layers)} VGG layers")
        if len(self.tier_weights) != len(self.tier_thresholds) + 1:
            raise ValueError("tier_weights needs one more entry than tier_thresholds")
        if sorted(self.tier_thresholds) != list(self.tier_thresholds):
            raise ValueError("tier_thresholds must be increasing")


def difficulty_weights(scores: torch.Tensor, thresholds: Sequence[float], weights: Sequence[float]) -> torch.Tensor:
    """Per-score weight: tier = number of thresholds <= score; returns ``weights[tier]``."""
    bounds = torch.tensor(list(thresholds), dtype=scores.dtype, device=scores.device)
    tiers = torch.bucketize(scores, bounds, right=True)
    return torch.tensor(list(weights), dtype=scores.dtype, device=scores.device)[tiers]


def _distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).abs().flatten(1).mean(1)  # per sample


class DifficultyAdaptivePerceptualLoss(nn.Module):
    def __init__(self, cfg: PerceptualConfig, perceiver: nn.Module | None = None, vgg: VGGFeatures | None = None):
        super().__init__()
        self.cfg = cfg
        self.vgg = vgg if vgg is not None else VGGFeatures(cfg.vgg)
        self.perceiver = perceiver.requires_grad_(False) if perceiver is not None else None

    @torch.no_grad()
    def negative_weights(self, restored: torch.Tensor, negatives: Sequence[torch.Tensor]) -> torch.Tensor:
        """N x B difficulty weights (all 1 without a perceiver)."""
        if self.perceiver is None:
            return torch.ones(len(negatives), restored.shape[0], device=restored.device, dtype=restored.dtype)
        scores = torch.stack([self.perceiver.quality_score(n.clamp(0, 1)) for n in negatives])
        if self.cfg.difficulty_reference == "relative":
            scores = scores - self.perceiver.quality_score(restored.detach().clamp(0, 1))[None]
        return difficulty_weights(scores.float(), self.cfg.tier_thresholds, self.cfg.tier_weights).to(restored.dtype)

    def forward(
        self,
        restored: torch.Tensor,
        target: torch.Tensor,
        negatives: Sequence[torch.Tensor],
        weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if weights is None:
            weights = self.negative_weights(restored, negatives)
        anchor = self.vgg(restored)
        with torch.no_grad():
            positive = self.vgg(target)
            negative_feats = [self.vgg(n) for n in negatives]
        loss = restored.new_zeros(restored.shape[0])
        for layer, w in enumerate(self.cfg.layer_weights):
            d_pos = _distance(anchor[layer], positive[layer])
            d_neg = sum(weights[n] * _distance(anchor[layer], feats[layer]) for n, feats in enumerate(negative_feats))
            loss = loss + w * d_pos / (d_neg + self.cfg.eps)
        return loss.mean()
