"""Typed settings of the training loop, the optimiser and the DeepSpeed engine."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional


@dataclass
class OptimizerConfig:
    lr: float = 2e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-4
    warmup_steps: int = 0
    min_lr: float = 1e-6  # the cosine floor

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(f"need 0 <= min_lr <= lr and lr > 0, got lr={self.lr}, min_lr={self.min_lr}")
        if self.warmup_steps < 0:
            raise ValueError("warmup_steps must be >= 0")

    @property
    def floor(self) -> float:
        return self.min_lr / self.lr


@dataclass
class EngineConfig:
    deepspeed_config: str = "configs/deepspeed/zero1.json"  # relative to the job's working folder
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on a GPU that has it, fp32 on the CPU
    gradient_accumulation_steps: int = 1  # per rank at the largest worker count, when global_batch is not set
    # samples per optimiser step over all ranks, kept at every world size of an elastic run (the
    # accumulation follows); None: batch_size x gradient_accumulation_steps x the largest worker count
    # (a job records the value it resolved, so that a relaunch keeps it)
    global_batch: Optional[int] = None
    gradient_clipping: float = 1.0
    zero_stage: Optional[int] = None  # overrides the stage in the DeepSpeed file

    def __post_init__(self) -> None:
        if self.gradient_accumulation_steps < 1:
            raise ValueError("gradient_accumulation_steps must be >= 1")
        if self.global_batch is not None and self.global_batch < 1:
            raise ValueError(f"engine.global_batch must be >= 1, got {self.global_batch}")
        if self.zero_stage is not None and self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0..3, got {self.zero_stage}")


@dataclass
class FailureInjectionConfig:
    """Kill one worker once, to exercise recovery (tests and drills); off by default."""

    at_step: Optional[int] = None
    at_steps: list[int] = field(default_factory=list)  # deaths at these steps too, once each ('<marker>.step<n>')
    rank: int = 1
    marker: Optional[str] = None  # a file created before dying: its presence means "already failed once"


@dataclass
class LoopConfig:
    max_steps: int = 1000
    stop_after_steps: Optional[int] = None  # end this launch at that step (a relaunch continues)
    log_every: int = 10
    val_every: int = 100
    checkpoint_every: int = 100
    grid_every_validations: int = 1
    seed: int = 0
    preemption_check_every: int = 1  # steps between checks for a preemption notice (0: never)
    failure_injection: FailureInjectionConfig = field(default_factory=FailureInjectionConfig)

    def __post_init__(self) -> None:
        for name in ("max_steps", "log_every", "val_every", "checkpoint_every", "grid_every_validations"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.preemption_check_every < 0:
            raise ValueError("preemption_check_every must be >= 0")

    @property
    def last_step(self) -> int:
        """The step this launch ends at."""
        if self.stop_after_steps is None:
            return self.max_steps
        return min(self.max_steps, self.stop_after_steps)
