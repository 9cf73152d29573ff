"""Typed configuration of the degradation engine (embeddable in any job config)."""

from __future__ import annotations


from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from .registry import LEVELS, get, names

__all__ = ["SeverityConfig", "MixedConfig", "DegradationConfig"]

SINGLE_TYPES = (
    "gaussian_noise",
    "poisson_gaussian_noise",
    "gaussian_blur",
    "motion_blur",
    "rain",
    "haze",
    "low_light",
    "jpeg",
)


@dataclass
class SeverityConfig:
    """How a sample's severity is drawn.

    ``uniform``: in [low, high]; ``beta``: low + (high - low) * Beta(beta_a, beta_b);
    ``levels``: one of the named ``levels`` with equal probability; ``fixed``: ``value``.
    """

    distribution: Literal["uniform", "beta", "levels", "fixed"] = "uniform"
    low: float = 0.0
    high: float = 1.0
    beta_a: float = 2.0
    beta_b: float = 2.0
    levels: list[str] = field(default_factory=lambda: list(LEVELS))
    value: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 <= self.low <= self.high <= 1.0:
            raise ValueError(f"severity needs 0 <= low <= high <= 1, got low={self.low}, high={self.high}")
        if self.beta_a <= 0 or self.beta_b <= 0:
            raise ValueError("severity beta_a and beta_b must be positive")
        if not 0.0 <= self.value <= 1.0:
            raise ValueError(f"severity value must lie in [0, 1], got {self.value}")
        if self.distribution == "levels" and not self.levels:
            raise ValueError("severity distribution 'levels' needs at least one level")

    def sample(self, rng: np.random.Generator) -> tuple[float | None, str | None]:
        """(severity, None) or (None, level name)."""
        if self.distribution == "levels":
            return None, self.levels[int(rng.integers(len(self.levels)))]
        if self.distribution == "fixed":
            return self.value, None
        if self.distribution == "beta":
            return self.low + (self.high - self.low) * float(rng.beta(self.beta_a, self.beta_b)), None
        return float(rng.uniform(self.low, self.high)), None


@dataclass
class MixedConfig:
    """Which types a mixed sample chains, and how many of them."""

    types: list[str] = field(default_factory=lambda: [t for t in SINGLE_TYPES if t != "poisson_gaussian_noise"])
    min_steps: int = 2
    max_steps: int = 3

    def __post_init__(self) -> None:
        for name in self.types:
            if name == "mixed" or name not in names():
                raise ValueError(f"mixed.types: '{name}' is not a single degradation type ({', '.join(SINGLE_TYPES)})")
        if len(set(self.types)) != len(self.types):
            raise ValueError("mixed.types must not repeat a type")
        if not 1 <= self.min_steps <= self.max_steps <= len(self.types):
            raise ValueError(
                f"mixed needs 1 <= min_steps <= max_steps <= len(types)={len(self.types)}, "
                f"got {self.min_steps}..{self.max_steps}"
            )


@dataclass
class DegradationConfig:
    """The mixture of degradation types (relative weights), the severity distribution
    (with optional per-type overrides) and the seed of the whole synthesis."""

    seed: int = 0
    mixture: dict[str, float] = field(default_factory=lambda: {name: 1.0 for name in (*SINGLE_TYPES, "mixed")})
    severity: SeverityConfig = field(default_factory=SeverityConfig)
    type_severity: dict[str, SeverityConfig] = field(default_factory=dict)
    mixed: MixedConfig = field(default_factory=MixedConfig)

    def __post_init__(self) -> None:
        for name, weight in self.mixture.items():
            if name not in names():
                raise ValueError(f"mixture: unknown degradation '{name}'; known: {', '.join(names())}")
            if weight < 0:
                raise ValueError(f"mixture: weight of '{name}' must be >= 0, got {weight}")
        if sum(self.mixture.values()) <= 0:
            raise ValueError("mixture: at least one weight must be positive")
        for name in self.type_severity:
            if name not in self.mixture:
                raise ValueError(f"type_severity: '{name}' is not in the mixture")
        for name in self.mixture:
            dist = self.severity_for(name)
            if dist.distribution != "levels":
                continue
            known = LEVELS if name == "mixed" else get(name).levels
            for level in dist.levels:
                if level not in known:
                    raise ValueError(f"severity level '{level}' is not defined for '{name}'; known: {', '.join(known)}")

    def severity_for(self, name: str) -> SeverityConfig:
        return self.type_severity.get(name, self.severity)

    def probabilities(self) -> tuple[list[str], np.ndarray]:
        types = [t for t, w in self.mixture.items() if w > 0]
        weights = np.array([self.mixture[t] for t in types], dtype=np.float64)
        return types, weights / weights.sum()



