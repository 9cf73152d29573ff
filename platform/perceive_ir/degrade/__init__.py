"""Batched, seeded degradation synthesis on the batch's own device.

Usage inside a training step::

    from perceive_ir.degrade import Degrader, DegradationConfig

    degrader = Degrader(DegradationConfig(seed=7))
    degraded, labels = degrader(clean, keys=batch["__key__"], epoch=epoch)
    labels.type_index, labels.severity  # (B,) tensors on clean.device
    labels.params[i]                    # the exact parameters used for sample i

Importing this package registers every type (the order below is the type index).
"""

from . import noise, blur, rain, haze, lowlight, jpeg, mixed  # noqa: F401  (registration order)
from .config import DegradationConfig, MixedConfig, SeverityConfig
from .engine import Degrader, Labels, Spec
from .registry import LEVELS, Degradation, get, names, register
from .rng import SampleRNG, sample_seed

__all__ = [
    "Degrader",
    "Spec",
    "Labels",
    "DegradationConfig",
    "SeverityConfig",
    "MixedConfig",
    "Degradation",
    "register",
    "get",
    "names",
    "LEVELS",
    "SampleRNG",
    "sample_seed",
]
