"""L_dpl: difficulty-adaptive perceptual loss, a contrastive ratio in frozen VGG-16 features.

    L = mean_b sum_l w_l * D_l(R_b, G_b) / (sum_n a_{n,b} * D_l(R_b, N_{n,b}) + eps)

with D_l the mean absolute difference of layer-l features, R the restored image (anchor), G the
ground truth (positive) and N_n the negatives: N_0 the degraded input (easy), N_1.. the
medium-tier outputs (hard). Two rules set the difficulty weights a_{n,b} (``difficulty_rule``):

- ``reference`` (the paper's public re-implementation): the degraded input weighs
  ``degraded_weight`` (2); a medium-tier negative weighs ``hard_weight`` (1.25) when its PSNR
  against the ground truth is at or below the probe PSNR, the current model's mean PSNR on a fixed
  probe set (measured by the training loop at the start of each epoch), else ``easy_weight`` (0.75).
  The probe set is drawn from the training distribution (``probe_source: training``: the training
  stream's first ``probe_images`` samples, paired sources with their own pairs, synthetic ones
  degraded as in training) or is the validation set (``validation``). With ``probe: per_task``
  each sample is compared with the probe PSNR of its own degradation type (a type the probe did not
  draw takes the pooled value); ``pooled`` uses one number. ``probe_psnr`` is a buffer (one slot
  per registered type, the pooled value last): it follows the module's device and is saved in
  checkpoints. Until a first measurement it is +inf, so every medium-tier negative counts as hard;
  the loop measures before step 1, so only a forward outside the loop sees that.
- ``perceiver`` (this project's definition): the stage-1 perceiver scores every negative,
  degraded input included; with ``difficulty_reference: relative`` the score is taken minus the
  current output's score. Thresholds t_1 < ... < t_{T-1} split scores into T tiers (tier = number
  of thresholds <= score) and tier k weighs ``tier_weights[k]``. Without a perceiver all weigh 1.

The features, distances, weights and the ratio are fp32 whatever the dtype of the images (a bf16
trainer): the frozen VGG-16 keeps fp32 weights (``models.precision``), and in bf16 the small
distances of the ratio drown in rounding. The loss is an fp32 scalar; gradients reach the
restored image in its own dtype.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal, Sequence

import torch
from torch import nn

from perceive_ir.degrade import names as degradation_names
from perceive_ir.eval.metrics import psnr
from perceive_ir.models.precision import full_precision
from perceive_ir.models.vgg_features import VGGConfig, VGGFeatures

__all__ = ["PerceptualConfig", "DifficultyAdaptivePerceptualLoss", "difficulty_weights", "reference_weights"]


@dataclasses.dataclass
class PerceptualConfig:
    vgg: VGGConfig = dataclasses.field(default_factory=VGGConfig)
    layer_weights: list[float] = dataclasses.field(default_factory=lambda: [1 / 12, 1 / 6, 1 / 3, 1.0])
    difficulty_rule: Literal["reference", "perceiver"] = "reference"
    # rule "reference"
    hard_weight: float = 1.25  # a medium-tier negative at or below the probe PSNR
    easy_weight: float = 0.75  # a medium-tier negative above it
    degraded_weight: float = 2.0  # the degraded input, always
    probe: Literal["per_task", "pooled"] = "per_task"  # a probe PSNR per degradation type, or one
    probe_source: Literal["training", "validation"] = "training"  # where the probe images come from
    probe_images: int = 64  # drawn from the training stream (probe_source: training)
    # rule "perceiver"
    tier_thresholds: list[float] = dataclasses.field(default_factory=lambda: [1 / 3, 2 / 3])
    tier_weights: list[float] = dataclasses.field(default_factory=lambda: [0.75, 1.0, 1.25])
    difficulty_reference: Literal["absolute", "relative"] = "absolute"
    eps: float = 1e-7

    def __post_init__(self) -> None:
        if len(self.layer_weights) != len(self.vgg.layers):
            raise ValueError(f"{len(self.layer_weights)} layer_weights for {len(self.vgg.layers)} VGG layers")
        if self.difficulty_rule not in ("reference", "perceiver"):
            raise ValueError(f"difficulty_rule must be 'reference' or 'perceiver', got '{self.difficulty_rule}'")
        if self.probe_images < 1:
            raise ValueError(f"probe_images must be >= 1, got {self.probe_images}")
        for name in ("hard_weight", "easy_weight", "degraded_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if len(self.tier_weights) != len(self.tier_thresholds) + 1:
            raise ValueError("tier_weights needs one more entry than tier_thresholds")
        if sorted(self.tier_thresholds) != list(self.tier_thresholds):
            raise ValueError("tier_thresholds must be increasing")


def difficulty_weights(scores: torch.Tensor, thresholds: Sequence[float], weights: Sequence[float]) -> torch.Tensor:
    """Rule ``perceiver``: tier = number of thresholds <= score; returns ``weights[tier]``."""
    bounds = torch.tensor(list(thresholds), dtype=scores.dtype, device=scores.device)
    tiers = torch.bucketize(scores, bounds, right=True)
    return torch.tensor(list(weights), dtype=scores.dtype, device=scores.device)[tiers]


def reference_weights(medium_psnr: torch.Tensor, probe_psnr: torch.Tensor, hard: float = 1.25,
                      easy: float = 0.75, degraded: float = 2.0) -> torch.Tensor:
    """Rule ``reference``: M x B PSNRs of the medium-tier negatives -> (1 + M) x B weights, row 0
    the degraded input's (``degraded``), then ``hard`` where PSNR <= ``probe_psnr`` else ``easy``."""
    medium = torch.where(medium_psnr <= probe_psnr, hard, easy).to(medium_psnr.dtype)
    return torch.cat([medium_psnr.new_full((1, medium_psnr.shape[1]), degraded), medium])


def _distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).abs().flatten(1).mean(1)  # per sample


class DifficultyAdaptivePerceptualLoss(nn.Module):
    def __init__(self, cfg: PerceptualConfig, perceiver: nn.Module | None = None, vgg: VGGFeatures | None = None):
        super().__init__()
        self.cfg = cfg
        self.vgg = vgg if vgg is not None else VGGFeatures(cfg.vgg)
        self.perceiver = perceiver.requires_grad_(False) if perceiver is not None else None
        self._type_slots = {name: i for i, name in enumerate(degradation_names())}
        if self.uses_probe:  # one slot per registered type, then the pooled value
            self.register_buffer("probe_psnr", torch.full((len(self._type_slots) + 1,), math.inf))
        self.probe_types: list[str] = []  # the types the last measurement drew (rank 0)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        saved = state_dict.get(prefix + "probe_psnr")
        if self.uses_probe and saved is not None and saved.numel() == 1:  # a checkpoint of the pooled-only rule
            state_dict[prefix + "probe_psnr"] = saved.reshape(1).expand_as(self.probe_psnr).clone()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def slot_of(self, kind: str) -> int:
        """The probe slot of a degradation type (the pooled slot for a label no type registers)."""
        return self._type_slots.get(kind, len(self._type_slots))

    def probe_for(self, type_index: torch.Tensor | None) -> torch.Tensor:
        """Each sample's probe PSNR, (B,), or the pooled one, (1,) (rule ``pooled``, or no types given).
        ``type_index`` holds registry positions for registered types (``train.steps.type_index``)."""
        pooled = self.probe_psnr[-1:]
        if self.cfg.probe == "pooled" or type_index is None:
            return pooled
        slots = torch.where(type_index < len(self._type_slots), type_index, torch.full_like(type_index, len(self._type_slots)))
        return self.probe_psnr[slots]

    @property
    def uses_probe(self) -> bool:
        """Whether the weights need the current model's probe PSNR (rule ``reference``)."""
        return self.cfg.difficulty_rule == "reference"

    @torch.no_grad()
    def negative_weights(self, restored: torch.Tensor, target: torch.Tensor,
                         negatives: Sequence[torch.Tensor], type_index: torch.Tensor | None = None) -> torch.Tensor:
        """N x B fp32 difficulty weights; ``negatives[0]`` is the degraded input; ``type_index`` each
        sample's degradation type (rule ``reference`` with ``probe: per_task``)."""
        if self.uses_probe:
            medium = [psnr(n.float().clamp(0, 1), target.float().clamp(0, 1)) for n in negatives[1:]]
            medium_psnr = torch.stack(medium) if medium else target.new_zeros(0, target.shape[0], dtype=torch.float32)
            cfg = self.cfg
            weights = reference_weights(medium_psnr.float(), self.probe_for(type_index).float(), cfg.hard_weight,
                                        cfg.easy_weight, cfg.degraded_weight)
            return weights.float()
        if self.perceiver is None:
            return torch.ones(len(negatives), restored.shape[0], device=restored.device, dtype=torch.float32)
        scores = torch.stack([self.perceiver.quality_score(n.clamp(0, 1)) for n in negatives])
        if self.cfg.difficulty_reference == "relative":
            scores = scores - self.perceiver.quality_score(restored.detach().clamp(0, 1))[None]
        return difficulty_weights(scores.float(), self.cfg.tier_thresholds, self.cfg.tier_weights)

    def forward(
        self,
        restored: torch.Tensor,
        target: torch.Tensor,
        negatives: Sequence[torch.Tensor],
        weights: torch.Tensor | None = None,
        type_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if weights is None:
            weights = self.negative_weights(restored, target, negatives, type_index)
        weights = weights.float()
        anchor = self.vgg(restored)  # fp32 features (the VGG casts)
        with torch.no_grad():
            positive = self.vgg(target)
            negative_feats = [self.vgg(n) for n in negatives]
        with full_precision(restored.device):
            loss = torch.zeros(restored.shape[0], device=restored.device, dtype=torch.float32)
            for layer, w in enumerate(self.cfg.layer_weights):
                d_pos = _distance(anchor[layer], positive[layer])
                d_neg = sum(weights[n] * _distance(anchor[layer], feats[layer])
                            for n, feats in enumerate(negative_feats))
                loss = loss + w * d_pos / (d_neg + self.cfg.eps)
            return loss.mean()
