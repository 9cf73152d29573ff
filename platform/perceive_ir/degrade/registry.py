"""The degradation interface and the registry of degradation types by name."""

from __future__ import annotations

from typing import Callable, Mapping, TypeVar

import numpy as np
import torch

from .rng import SampleRNG

__all__ = ["Degradation", "register", "get", "names", "LEVELS", "lerp"]

# Named severities shared by every type; a type may add its own (noise: sigma15...).
LEVELS: dict[str, float] = {"light": 0.2, "medium": 0.5, "heavy": 0.85}


def lerp(low: float, high: float, severity: float) -> float:
    return low + (high - low) * severity


class Degradation:
    """One degradation type.

    A subclass sets ``name`` and ``param_names`` and implements:

    * ``params_at(severity, rng)``: the parameters for a severity in [0, 1]; every
      magnitude is a monotone function of severity, ``rng`` draws only nuisance
      parameters (directions, orientations) that do not change how strong it is;
    * ``apply(images, params, rng)``: the degraded batch, batched over samples, on the
      images' device. ``params`` maps each name to a (B,) float32 tensor there.
    """

    name: str = ""
    param_names: tuple[str, ...] = ()
    # Each output pixel depends only on the same input pixel: on the CPU the engine may
    # then run the batch in cache-sized blocks of samples (same result, less memory traffic).
    pointwise: bool = False
    # Parameters that are exact for a named level (e.g. sigma25 -> sigma 25.0).
    level_params: Mapping[str, Mapping[str, float]] = {}
    extra_levels: Mapping[str, float] = {}

    @property
    def levels(self) -> dict[str, float]:
        return {**LEVELS, **self.extra_levels}

    def params_at(self, severity: float, rng: np.random.Generator) -> dict[str, float]:
        raise NotImplementedError

    def params_for_level(self, level: str, rng: np.random.Generator) -> dict[str, float]:
        params = self.params_at(self.levels[level], rng)
        params.update(self.level_params.get(level, {}))
        return params

    def check_params(self, params: Mapping[str, float]) -> dict[str, float]:
        missing = sorted(set(self.param_names) - set(params))
        unknown = sorted(set(params) - set(self.param_names))
        if missing or unknown:
            raise ValueError(
                f"degradation '{self.name}' takes parameters {list(self.param_names)}; "
                f"missing {missing}, unknown {unknown}"
            )
        return {k: float(params[k]) for k in self.param_names}

    def apply(self, images: torch.Tensor, params: Mapping[str, torch.Tensor], rng: SampleRNG) -> torch.Tensor:
        raise NotImplementedError


_REGISTRY: dict[str, Degradation] = {}
D = TypeVar("D", bound=type)


def register(name: str) -> Callable[[D], D]:
    """Class decorator: ``@register("gaussian_noise")`` adds one instance under ``name``."""

    def add(cls: D) -> D:
        if name in _REGISTRY:
            raise ValueError(f"degradation '{name}' is already registered")
        instance = cls()
        instance.name = name
        _REGISTRY[name] = instance
        return cls

    return add


def get(name: str) -> Degradation:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown degradation '{name}'; known: {', '.join(names())}") from None


def names() -> list[str]:
    """Registered type names, in registration order (a stable type index)."""
    return list(_REGISTRY)
