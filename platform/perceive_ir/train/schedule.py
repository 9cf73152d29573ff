"""Linear warm-up then cosine decay to a floor, as a LambdaLR factor per parameter group."""

from __future__ import annotations

import math
from typing import Callable

import torch

__all__ = ["warmup_cosine", "phase_factor", "build_scheduler"]


def warmup_cosine(step: int, warmup: int, total: int, floor: float) -> float:
    """Factor of the base learning rate at ``step``: 0 -> 1 over ``warmup`` steps, then cosine to ``floor``."""
    if total <= 0:
        return 1.0
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def phase_factor(start: int, length: int, warmup: int, floor: float) -> Callable[[int], float]:
    """A group trained only during [start, start + length): zero outside, warm-up + cosine inside.

    A zero learning rate leaves AdamW parameters exactly unchanged (the update and the decoupled
    weight decay are both scaled by it), which lets one optimiser train phases one after another."""

    def factor(step: int) -> float:
        if step < start or step >= start + length:
            return 0.0
        return warmup_cosine(step - start, warmup, length, floor)

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, factors: list[Callable[[int], float]]):
    if len(factors) != len(optimizer.param_groups):
        raise ValueError(f"{len(factors)} schedule factors for {len(optimizer.param_groups)} parameter groups")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factors)
