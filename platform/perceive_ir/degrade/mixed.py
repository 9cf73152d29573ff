"""The mixed mode: 2 or 3 distinct types chained in random order on one sample."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .registry import Degradation, register


@register("mixed")
class Mixed(Degradation):
    """A marker in the registry: the engine runs a mixed sample as a chain of other
    types, each step with the sample's severity and its own seed; its parameters are
    the list of steps."""

    param_names = ()

    @staticmethod
    def sample_chain(rng: np.random.Generator, types: Sequence[str], min_steps: int, max_steps: int) -> list[str]:
        steps = int(rng.integers(min_steps, max_steps + 1))
        order = rng.permutation(len(types))[:steps]
        return [types[i] for i in order]
