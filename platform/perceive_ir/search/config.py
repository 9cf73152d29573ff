"""Configuration of a search: the base stage-2 config, the space, the metric, the schedule of trials."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from perceive_ir.config import ConfigError, flatten, load_config, to_dict
from perceive_ir.orchestration.config import Stage2Config, set_setting
from perceive_ir.search.space import Distribution, parse_space, value_overrides, yaml_value

__all__ = ["MetricConfig", "SchedulerConfig", "SearchAlgorithmConfig", "SearchConfig", "SearchPlan", "plan_search", "make_plan",
           "QUALITY_METRIC"]

QUALITY_METRIC = "val/mean/quality_out"


@dataclass
class MetricConfig:
    name: str = "val/mean/psnr_out"  # any validation metric of stage 2
    mode: Literal["max", "min"] = "max"
    quality_weight: float = 0.0  # objective = name + (max) or - (min) quality_weight x val/mean/quality_out


@dataclass
class SchedulerConfig:
    name: Literal["asha", "fifo"] = "asha"
    grace_period: int = 1  # training steps before a trial can be stopped
    reduction_factor: float = 2.0

    def __post_init__(self) -> None:
        if self.grace_period < 1 or self.reduction_factor <= 1:
            raise ValueError("scheduler needs grace_period >= 1 and reduction_factor > 1")


@dataclass
class SearchAlgorithmConfig:
    name: Literal["random", "optuna"] = "random"  # random: random sampling and grid entries; optuna: TPE
    seed: Optional[int] = 0


@dataclass
class SearchConfig:
    name: str  # the search's name: a relaunch with the same name continues it
    base: str  # the stage-2 YAML every trial starts from
    space: dict[str, Any]
    stage2: dict[str, Any] = field(default_factory=dict)  # overrides of the base, as a nested mapping
    metric: MetricConfig = field(default_factory=MetricConfig)
    num_trials: int = 4  # samples (each repeats every grid entry)
    concurrency: int = 2  # at most; lowered to what the cluster can run at once
    # What an autoscaling cluster can grow to (e.g. {GPU: 16}: the GPU group's maxReplicas x GPUs per pod):
    # trials at once are sized to it, not to the nodes up at launch. Empty: the cluster as it is.
    cluster_capacity: dict[str, float] = field(default_factory=dict)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    search: SearchAlgorithmConfig = field(default_factory=SearchAlgorithmConfig)
    trial_driver_memory_mb: int = 256  # what the Tune function itself reserves (it holds no CPU)
    # Where the Tune functions (each with its trial's Train controller) may run: a custom resource that only
    # stable nodes offer (the head and the CPU group on Kubernetes: {stable_node: 0.01}), never a
    # preemptible GPU node. Empty: anywhere.
    trial_driver_resources: dict[str, float] = field(default_factory=dict)
    max_trial_failures: int = 3  # a trial whose node or function is lost is restarted this often (from its checkpoint)
    trial_store_wait_s: float = 900.0  # how long a (re)started trial, and the driver after the trials, wait for an away store
    state_save_period_s: float = 10.0  # how often Tune saves the search's state to storage
    stopped_trial_grace_s: int = 5  # a trial the scheduler stopped is killed after this many seconds
    register_as: Optional[str] = None  # register the best trial's restorer as '<register_as>-restorer'

    def __post_init__(self) -> None:
        if not self.name or any(c in self.name for c in "/\\ "):
            raise ValueError(f"name '{self.name}' must be non-empty, without spaces or slashes")
        if self.num_trials < 1 or self.concurrency < 1:
            raise ValueError("num_trials and concurrency must be >= 1")
        if self.trial_store_wait_s < 0:
            raise ValueError("trial_store_wait_s must be >= 0")


@dataclass
class SearchPlan:
    """A validated search: the base stage-2 config and the parsed space, ready to make trial configs."""

    cfg: SearchConfig
    where: str
    base: Stage2Config
    distributions: list[Distribution]
    # local paths of the base and its overrides and its tracking store, resolved against the launch folder
    # by the pre-flight (:func:`perceive_ir.search.preflight.preflight_search`); every trial config takes them
    resolved_settings: dict[str, str] = field(default_factory=dict)

    @property
    def keys(self) -> list[str]:
        return [d.key for d in self.distributions]

    @property
    def total_trials(self) -> int:
        """``num_trials`` samples, each repeating every combination of the grid entries."""
        return self.cfg.num_trials * math.prod(len(d.args) for d in self.distributions if d.kind == "grid")

    def trial_config(self, values: dict[str, Any], trial_name: str, storage_path: str) -> Stage2Config:
        """The stage-2 config of one trial: the base, the sampled ``values``, its own run name and storage;
        checkpoints at every validation (each validation is one Tune result)."""
        overrides = stage2_overrides(self.cfg) + value_overrides(values, to_dict(self.base)) + [
            f"name={trial_name}", f"storage.path={storage_path}", "tracking.register_as=null",
            f"loop.checkpoint_every={self.base.loop.val_every}", "loop.stop_after_steps=null"]
        trial = load_config(Stage2Config, self.cfg.base, overrides)
        for key, value in self.resolved_settings.items():
            set_setting(trial, key, value)
        return trial


def stage2_overrides(cfg: SearchConfig) -> list[str]:
    """The ``stage2`` section as ``key=value`` overrides of the base config."""
    return [f"{key}={yaml_value(value)}" for key, value in flatten(cfg.stage2).items()]


def make_plan(cfg: SearchConfig, where: str) -> SearchPlan:
    """The plan of a loaded search config: its space parsed, its base stage-2 config built."""
    distributions = parse_space(cfg.space, where)
    try:
        base = load_config(Stage2Config, cfg.base, stage2_overrides(cfg))
    except ConfigError as err:
        raise ConfigError(f"{where}: base stage-2 config '{cfg.base}' with the 'stage2' overrides: {err}") from None
    return SearchPlan(cfg, where, base, distributions)


def plan_search(path: str | Path, overrides: list[str] = ()) -> SearchPlan:
    """Load and check a search config: the base, every value of every distribution, the metric. Raises
    :class:`ConfigError` naming what is wrong; nothing here starts Ray."""
    cfg = load_config(SearchConfig, path, overrides)
    where = str(path)
    plan = make_plan(cfg, where)
    distributions, overrides_of_base, tree = plan.distributions, stage2_overrides(cfg), to_dict(plan.base)
    for dist in distributions:
        for value in dist.probe_values():
            try:
                load_config(Stage2Config, cfg.base, overrides_of_base + value_overrides({dist.key: value}, tree))
            except ConfigError as err:
                detail = re.sub(r"^command-line override '[^']*': ", "", str(err))
                raise ConfigError(f"{where}: search space '{dist.key}' ({dist.kind} {list(dist.args)}) with value "
                                  f"{value!r}: {detail}") from None
    if cfg.search.name == "optuna":
        for dist in distributions:
            if dist.kind in ("grid", "qloguniform"):
                raise ConfigError(f"{where}: search space '{dist.key}': '{dist.kind}' is not available with "
                                  f"search.name 'optuna' (use choice, uniform, loguniform or quniform)")
    if cfg.metric.quality_weight and cfg.metric.name == QUALITY_METRIC:
        raise ConfigError(f"{where}: metric.quality_weight adds '{QUALITY_METRIC}' to itself")
    if not cfg.metric.name.startswith("val/"):
        raise ConfigError(f"{where}: metric.name '{cfg.metric.name}' must be a validation metric (val/...)")
    return plan
