"""The stage-2 objective L = L_rec + l1 * L_cl + l2 * L_clip + l3 * L_dpl, each term chosen by name
(+ ``identity`` * L_id, an optional term outside the paper, computed by the stage-2 model)."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
from torch import nn

from perceive_ir.losses.clip_quality import ClipQualityConfig, ClipQualityLoss
from perceive_ir.losses.contrast import ContrastConfig, DegradationContrastLoss
from perceive_ir.losses.perceptual import DifficultyAdaptivePerceptualLoss, PerceptualConfig
from perceive_ir.losses.reconstruction import ReconstructionLoss
from perceive_ir.components import ComponentSpec, Registry

__all__ = ["LOSSES", "LossConfig", "Stage2Loss"]

LOSSES: Registry[nn.Module] = Registry("loss")


@LOSSES.register("l1")
def _l1(perceiver: nn.Module | None = None) -> nn.Module:
    return ReconstructionLoss()


@LOSSES.register("infonce", ContrastConfig)
def _infonce(cfg: ContrastConfig, perceiver: nn.Module | None = None) -> nn.Module:
    return DegradationContrastLoss(cfg)


@LOSSES.register("clip_quality", ClipQualityConfig)
def _clip_quality(cfg: ClipQualityConfig, perceiver: nn.Module | None = None) -> nn.Module:
    if perceiver is None:
        raise ValueError("the CLIP quality loss needs the stage-1 perceiver")
    return ClipQualityLoss(perceiver, cfg)


@LOSSES.register("difficulty_adaptive_perceptual", PerceptualConfig)
def _perceptual(cfg: PerceptualConfig, perceiver: nn.Module | None = None) -> nn.Module:
    return DifficultyAdaptivePerceptualLoss(cfg, perceiver)


def _spec(value: ComponentSpec | dict | str) -> ComponentSpec:
    if isinstance(value, ComponentSpec):
        return value
    return ComponentSpec(value) if isinstance(value, str) else ComponentSpec(**value)


@dataclasses.dataclass
class LossConfig:
    l1: float = 0.1  # degradation contrast
    l2: float = 0.05  # CLIP quality
    l3: float = 0.1  # difficulty-adaptive perceptual
    # Not in the paper: L_id = |R(clean) - clean| on a share of the batch's clean images, weighted by
    # ``identity``. It teaches a small restorer to leave an image that needs no restoration alone
    # (see docs/training.md, the quickstart pipeline); 0 leaves the objective as published.
    identity: float = 0.0
    identity_share: float = 0.25
    reconstruction: ComponentSpec = dataclasses.field(default_factory=lambda: ComponentSpec("l1"))
    contrast: ComponentSpec = dataclasses.field(default_factory=lambda: ComponentSpec("infonce"))
    quality: ComponentSpec = dataclasses.field(default_factory=lambda: ComponentSpec("clip_quality"))
    perceptual: ComponentSpec = dataclasses.field(
        default_factory=lambda: ComponentSpec("difficulty_adaptive_perceptual")
    )

    def __post_init__(self) -> None:
        if self.identity < 0:
            raise ValueError(f"loss.identity must be >= 0, got {self.identity}")
        if not 0 < self.identity_share <= 1:
            raise ValueError(f"loss.identity_share must be in (0, 1], got {self.identity_share}")
        for name in ("reconstruction", "contrast", "quality", "perceptual"):
            spec = _spec(getattr(self, name))
            setattr(self, name, spec)
            LOSSES.config(spec.name, spec.params, f"loss.{name}.params")

    def build(self, perceiver: nn.Module | None = None) -> "Stage2Loss":
        return Stage2Loss(self, perceiver)


class Stage2Loss(nn.Module):
    """``terms = loss(restored, target, degraded, medium, codes)``; ``terms["total"]`` is L.

    ``medium``: medium-tier outputs (one tensor or a list), extra negatives of L_dpl.
    ``codes``: (anchor codes, positive codes, degradation types) for L_cl; without them (a
    restorer without CFE) the term is left out. Terms with weight 0 are not computed.
    ``cl_no_negative_frac`` (logged, detached, not part of the total): the share of L_cl's anchors
    that had no negative in the global batch.
    """

    def __init__(self, cfg: LossConfig, perceiver: nn.Module | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.reconstruction = LOSSES.build(cfg.reconstruction, perceiver=perceiver)
        self.contrast = LOSSES.build(cfg.contrast, perceiver=perceiver) if cfg.l1 else None
        self.quality = LOSSES.build(cfg.quality, perceiver=perceiver) if cfg.l2 else None
        self.perceptual = LOSSES.build(cfg.perceptual, perceiver=perceiver) if cfg.l3 else None

    def forward(
        self,
        restored: torch.Tensor,
        target: torch.Tensor,
        degraded: torch.Tensor,
        medium: torch.Tensor | Sequence[torch.Tensor] | None = None,
        codes: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
        type_index: torch.Tensor | None = None,  # each sample's degradation type (L_dpl's per-task probe)
    ) -> dict[str, torch.Tensor]:
        terms = {"rec": self.reconstruction(restored, target)}
        total = terms["rec"]
        if self.contrast is not None and codes is not None:
            terms["cl"], terms["cl_no_negative_frac"] = self.contrast(*codes)
            total = total + self.cfg.l1 * terms["cl"]
        if self.quality is not None:
            terms["clip"] = self.quality(restored)
            total = total + self.cfg.l2 * terms["clip"]
        if self.perceptual is not None:
            negatives = [degraded]
            if medium is not None:
                negatives += [medium] if isinstance(medium, torch.Tensor) else list(medium)
            terms["dpl"] = self.perceptual(restored, target, negatives, type_index=type_index)
            total = total + self.cfg.l3 * terms["dpl"]
        terms["total"] = total
        return terms
