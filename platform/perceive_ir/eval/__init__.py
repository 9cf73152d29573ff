"""Evaluation: PSNR/SSIM and the per-degradation-type validation on a fixed, seeded held-out set."""

from perceive_ir.eval.metrics import psnr, ssim
from perceive_ir.eval.validation import HeldOutSet, ValidationConfig, evaluate

__all__ = ["psnr", "ssim", "HeldOutSet", "ValidationConfig", "evaluate"]
