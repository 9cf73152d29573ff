"""The batched degradation engine: specs in, degraded batch and labels out."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from .config import DegradationConfig
from .mixed import Mixed
from .registry import LEVELS, get, names
from .rng import SampleRNG, derived_seed, sample_seed

__all__ = ["Spec", "Labels", "Degrader"]


@dataclass(frozen=True)
class Spec:
    """What to do to one sample: a type and either a severity in [0, 1], a named
    level, or explicit parameters. ``chain`` fixes the steps of a mixed sample."""

    type: str
    severity: float | None = None
    level: str | None = None
    params: Mapping[str, float] | None = None
    chain: Sequence[str] | None = None


@dataclass
class Labels:
    """Per-sample labels of a degraded batch.

    ``params[i]`` holds the exact parameters used: ``{name: value}`` for a single type,
    ``{"steps": [{"type": ..., "params": {...}}, ...]}`` for a mixed one. ``severity`` is
    NaN where a sample was given explicit parameters and no severity.
    """

    types: list[str]
    type_index: torch.Tensor
    severity: torch.Tensor
    levels: list[str | None]
    params: list[dict[str, Any]]
    seeds: list[int]

    def __len__(self) -> int:
        return len(self.types)


@dataclass
class _Plan:
    severity: float
    level: str | None
    steps: list[tuple[str, dict[str, float], int]] = field(default_factory=list)  # (type, params, seed)


class Degrader:
    """Degrades batches on their own device, seeded per sample.

    >>> degrader = Degrader(DegradationConfig(seed=7))
    >>> degraded, labels = degrader(clean, keys=batch_keys, epoch=epoch)
    >>> degraded, labels = degrader(clean, keys, specs=[Spec("gaussian_noise", level="sigma25")] * len(keys))
    """

    def __init__(self, config: DegradationConfig | None = None):
        self.config = config or DegradationConfig()

    def seeds(self, keys: Sequence[object], epoch: int) -> list[int]:
        return [sample_seed(self.config.seed, key, epoch) for key in keys]

    def sample_specs(self, keys: Sequence[object], epoch: int = 0) -> list[Spec]:
        """Types and severities drawn from the configured mixture, per sample key."""
        types, probabilities = self.config.probabilities()
        rng = SampleRNG(self.seeds(keys, epoch), "cpu")
        specs = []
        for i in range(len(keys)):
            draw = rng.numpy(i, "spec")
            name = types[int(draw.choice(len(types), p=probabilities))]
            severity, level = self.config.severity_for(name).sample(draw)
            specs.append(Spec(name, severity=severity, level=level))
        return specs

    def _plan(self, spec: Spec, seed: int) -> _Plan:
        draws = SampleRNG([seed], "cpu")
        if spec.type == "mixed":
            if spec.params is not None:
                raise ValueError("a mixed spec takes a severity or level (and optionally a chain), not params")
            severity = _severity(spec, LEVELS)
            mixed = self.config.mixed
            chain = list(spec.chain) if spec.chain else Mixed.sample_chain(
                draws.numpy(0, "chain"), mixed.types, mixed.min_steps, mixed.max_steps
            )
            plan = _Plan(severity, spec.level)
            for step, name in enumerate(chain):
                step_seed = derived_seed(seed, "step", step)
                params = get(name).params_at(severity, SampleRNG([step_seed], "cpu").numpy(0, "params"))
                plan.steps.append((name, params, step_seed))
            return plan
        kind = get(spec.type)
        nuisance = draws.numpy(0, "params")
        if spec.params is not None:
            severity = _severity(spec, kind.levels, allow_none=True)
            return _Plan(severity, spec.level, [(spec.type, kind.check_params(spec.params), seed)])
        severity = _severity(spec, kind.levels)
        if spec.level is not None:
            params = kind.params_for_level(spec.level, nuisance)
        else:
            params = kind.params_at(severity, nuisance)
        return _Plan(severity, spec.level, [(spec.type, params, seed)])

    @torch.no_grad()
    def __call__(
        self,
        images: torch.Tensor,
        keys: Sequence[object],
        epoch: int = 0,
        specs: Sequence[Spec] | None = None,
    ) -> tuple[torch.Tensor, Labels]:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be B x 3 x H x W, got {tuple(images.shape)}")
        if len(keys) != images.shape[0]:
            raise ValueError(f"got {len(keys)} keys for a batch of {images.shape[0]}")
        if specs is None:
            specs = self.sample_specs(keys, epoch)
        if len(specs) != len(keys):
            raise ValueError(f"got {len(specs)} specs for a batch of {len(keys)}")
        seeds = self.seeds(keys, epoch)
        plans = [self._plan(spec, seed) for spec, seed in zip(specs, seeds)]
        degraded = _run(images, plans)
        return degraded, _labels(specs, plans, seeds, images.device)


def _severity(spec: Spec, levels: Mapping[str, float], allow_none: bool = False) -> float:
    if spec.level is not None:
        if spec.level not in levels:
            raise ValueError(f"'{spec.type}' has no level '{spec.level}'; known: {', '.join(levels)}")
        return levels[spec.level]
    if spec.severity is None:
        if allow_none:
            return math.nan
        raise ValueError(f"spec for '{spec.type}' needs a severity, a level or params")
    if not 0.0 <= spec.severity <= 1.0:
        raise ValueError(f"severity must lie in [0, 1], got {spec.severity}")
    return float(spec.severity)


def _run(images: torch.Tensor, plans: list[_Plan]) -> torch.Tensor:
    """Apply step s of every plan, one batched call per type, for s = 0, 1, 2."""
    # Half-precision batches are degraded in float32 and returned in their own dtype.
    work = images.float() if images.dtype in (torch.float16, torch.bfloat16) else images
    return _run_steps(work, plans).to(images.dtype)


def _run_steps(images: torch.Tensor, plans: list[_Plan]) -> torch.Tensor:
    out = images
    depth = max(len(p.steps) for p in plans)
    for step in range(depth):
        groups: dict[str, list[int]] = {}
        for i, plan in enumerate(plans):
            if step < len(plan.steps):
                groups.setdefault(plan.steps[step][0], []).append(i)
        for name, members in groups.items():
            kind = get(name)
            rows = [plans[i].steps[step] for i in members]
            params = {
                p: torch.tensor([r[1][p] for r in rows], dtype=torch.float32).to(images.device)
                for p in kind.param_names
            }
            rng = SampleRNG([r[2] for r in rows], images.device)
            if len(members) == len(plans):
                out = _apply(kind, out, params, rng)
            else:
                if out is images:
                    out = images.clone()
                index = torch.tensor(members, dtype=torch.int64).to(images.device)
                out.index_copy_(0, index, _apply(kind, out.index_select(0, index), params, rng))
    return out if out is not images else images.clone()


# Elements per block when a pointwise type runs on the CPU (a few MiB per float tensor).
_CPU_BLOCK = 1 << 19


def _apply(kind, images: torch.Tensor, params: dict[str, torch.Tensor], rng: SampleRNG) -> torch.Tensor:
    per_sample = images[0].numel()
    block = max(1, _CPU_BLOCK // max(1, per_sample))
    if images.device.type != "cpu" or not kind.pointwise or block >= len(images):
        return kind.apply(images, params, rng).to(images.dtype)
    out = torch.empty_like(images)
    for start in range(0, len(images), block):
        rows = range(start, min(len(images), start + block))
        part = {name: value[rows.start : rows.stop] for name, value in params.items()}
        out[rows.start : rows.stop] = kind.apply(images[rows.start : rows.stop], part, rng.subset(rows))
    return out


def _labels(specs: Sequence[Spec], plans: list[_Plan], seeds: list[int], device: torch.device) -> Labels:
    order = {name: i for i, name in enumerate(names())}
    params: list[dict[str, Any]] = []
    for spec, plan in zip(specs, plans):
        if spec.type == "mixed":
            params.append({"steps": [{"type": t, "params": dict(p)} for t, p, _ in plan.steps]})
        else:
            params.append(dict(plan.steps[0][1]))
    return Labels(
        types=[s.type for s in specs],
        type_index=torch.tensor([order[s.type] for s in specs], dtype=torch.int64).to(device),
        severity=torch.tensor([p.severity for p in plans], dtype=torch.float32).to(device),
        levels=[p.level for p in plans],
        params=params,
        seeds=seeds,
    )
