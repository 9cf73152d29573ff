"""Stage-2 losses: reconstruction, degradation contrast, CLIP quality, difficulty-adaptive perceptual."""

from perceive_ir.losses.clip_quality import ClipQualityConfig, ClipQualityLoss
from perceive_ir.losses.combined import LOSSES, LossConfig, Stage2Loss
from perceive_ir.losses.contrast import ContrastConfig, DegradationContrastLoss, gather_with_grad
from perceive_ir.losses.perceptual import (
    DifficultyAdaptivePerceptualLoss,
    PerceptualConfig,
    difficulty_weights,
    reference_weights,
)
from perceive_ir.losses.reconstruction import ReconstructionLoss

__all__ = [
    "LOSSES",
    "ClipQualityConfig",
    "ClipQualityLoss",
    "ContrastConfig",
    "DegradationContrastLoss",
    "DifficultyAdaptivePerceptualLoss",
    "LossConfig",
    "PerceptualConfig",
    "ReconstructionLoss",
    "Stage2Loss",
    "difficulty_weights",
    "gather_with_grad",
    "reference_weights",
]
