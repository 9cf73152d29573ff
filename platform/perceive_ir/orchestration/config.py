"""Typed configuration of the two training jobs (stage 1, stage 2) and of where and how they run."""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from typing import Optional, Union

from perceive_ir.config import to_dict
from perceive_ir.data.pipeline import LoaderConfig, LoaderPhase, PhaseLoader
from perceive_ir.degrade import DegradationConfig
from perceive_ir.eval.validation import ValidationConfig
from perceive_ir.losses import LossConfig
from perceive_ir.models import PerceiverConfig, RestorerConfig
from perceive_ir.tracking import TrackingConfig
from perceive_ir.train.config import EngineConfig, LoopConfig, OptimizerConfig
from perceive_ir.train.elastic import check_sizes, global_micro_batches

__all__ = ["RaySettings", "RunStorageConfig", "DataSection", "JobConfig", "Stage1Config", "Stage2Config",
           "path_settings", "is_local_path", "set_setting"]


@dataclass
class RaySettings:
    address: Optional[str] = None  # None: a submitted job's cluster, else RAY_ADDRESS's, else a new local Ray
    # an int: that many workers; [min, max]: elastic, as many as the cluster gives (at least min),
    # shrinking when workers are lost and growing back when resources return
    num_workers: Union[int, tuple[int, int]] = 2
    resize_check_s: float = 60.0  # elastic: how often a healthy run looks for room to grow
    # How long a new worker group may take to start (Ray's default: 60 s). After a node loss, Ray's
    # view of the cluster can still hold the lost node for up to about 20 s; a start that asked for
    # its slots waits this long before the group is retried at the size that fits.
    worker_start_timeout_s: Optional[float] = None
    use_gpu: bool = False
    resources_per_worker: dict[str, float] = field(default_factory=lambda: {"CPU": 1.0})
    health_check_interval_s: Optional[float] = None  # RAY_TRAIN_HEALTH_CHECK_INTERVAL_S for small runs
    local_cpus: Optional[int] = None  # CPUs of a new local Ray (None: all)
    # Niceness of the workers of a new local Ray. Ray's own default, 15, hands the CPU to any other
    # process on the machine, and with synchronous data parallelism one delayed rank stalls them all.
    local_worker_niceness: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.num_workers, (list, tuple)):
            self.num_workers = tuple(self.num_workers)
            if len(self.num_workers) != 2 or not 1 <= self.num_workers[0] <= self.num_workers[1]:
                raise ValueError(f"num_workers must be an int or [min, max] with 1 <= min <= max, got "
                                 f"{list(self.num_workers)}")
        elif self.num_workers < 1:
            raise ValueError("num_workers must be >= 1")
        if self.resize_check_s <= 0 or (self.worker_start_timeout_s is not None and self.worker_start_timeout_s <= 0):
            raise ValueError("resize_check_s and worker_start_timeout_s must be positive")
        if not 0 <= self.local_worker_niceness <= 19:
            raise ValueError(f"local_worker_niceness must be 0..19, got {self.local_worker_niceness}")

    @property
    def elastic(self) -> bool:
        return isinstance(self.num_workers, tuple)

    @property
    def worker_range(self) -> range:
        low, high = self.num_workers if isinstance(self.num_workers, tuple) else (self.num_workers,) * 2
        return range(low, high + 1)

    @property
    def max_workers(self) -> int:
        return self.worker_range[-1]


@dataclass
class RunStorageConfig:
    path: str = "runs/ray"  # a local folder or s3://bucket/prefix: checkpoints and Ray's run state
    endpoint_url: Optional[str] = None  # S3-compatible stores (MinIO, Ceph, ...); credentials from the environment
    keep_last: int = 3  # checkpoints kept
    max_failures: int = 2  # worker failures recovered from the last checkpoint

    def __post_init__(self) -> None:
        if self.keep_last < 1:
            raise ValueError("keep_last must be >= 1")


@dataclass
class DataSection:
    train: LoaderConfig
    degradation: DegradationConfig = field(default_factory=DegradationConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)


# The settings a run's checkpoints rest on. A relaunch under the run's name resumes its checkpoints,
# so changing one of these would continue (or fail to load) weights trained for something else; the
# pre-flight refuses it. The rest (cluster, storage, tracking, step counts, intervals) may change.
RUN_IDENTITY = ("restorer", "loss", "perceiver", "medium_tier", "clip_init_seed", "folds", "restorer_steps",
                "prompt_steps", "prompt_lr", "restorer_data", "prompt_data", "optimizer", "data.degradation",
                "data.train.patch_size", "data.train.batch_size", "loop.seed", "engine.gradient_accumulation_steps",
                "engine.global_batch")


def identity_settings(params: dict[str, str]) -> dict[str, str]:
    """The flattened settings of ``params`` that :data:`RUN_IDENTITY` names."""
    return {k: v for k, v in params.items() if any(k == p or k.startswith(p + ".") for p in RUN_IDENTITY)}


@dataclass
class JobConfig:
    name: str  # the run name: a relaunch with the same name continues the run
    data: DataSection
    loop: LoopConfig = field(default_factory=LoopConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    ray: RaySettings = field(default_factory=RaySettings)
    storage: RunStorageConfig = field(default_factory=RunStorageConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        if not self.name or any(c in self.name for c in "/\\ "):
            raise ValueError(f"name '{self.name}' must be non-empty, without spaces or slashes")
        check_sizes(self.global_micro_batches, self.data.train.batch_size, self.ray.worker_range)
        if self.engine.global_batch is None:  # recorded with the run: a relaunch must keep it (RUN_IDENTITY)
            self.engine.global_batch = self.global_micro_batches * self.data.train.batch_size

    @property
    def global_micro_batches(self) -> int:
        """Micro-batches per optimiser step, the same at every world size of the run."""
        return global_micro_batches(self.data.train.batch_size, self.engine.gradient_accumulation_steps,
                                    self.ray.max_workers, self.engine.global_batch)


@dataclass
class Stage1Config(JobConfig):
    """Stage 1: K hold-out restorers (or given ones), then the perceiver's prompts.

    ``loop.max_steps`` is derived: restorer_steps (0 when ``medium_tier`` is given) + prompt_steps.
    Each phase may crop, batch and mix the sources its own way (``restorer_data``, ``prompt_data``:
    unset fields keep ``data.train``'s); the number of micro-batches per step stays the run's."""

    restorer: RestorerConfig = field(default_factory=lambda: RestorerConfig(conditioning={"name": "none"}))
    folds: int = 2
    restorer_steps: int = 1000
    prompt_steps: int = 1000
    prompt_lr: float = 4e-5
    medium_tier: Optional[str] = None  # reuse trained fold restorers: a folder or an MLflow URI
    restorer_data: PhaseLoader = field(default_factory=PhaseLoader)
    prompt_data: PhaseLoader = field(default_factory=PhaseLoader)
    perceiver: PerceiverConfig = field(default_factory=PerceiverConfig)
    clip_init_seed: Optional[int] = None  # no pretrained CLIP (offline tiny profile): a seeded random one

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.folds < 2:
            raise ValueError("folds must be >= 2 (hold-out needs K >= 2)")
        if self.prompt_steps < 1 or self.restorer_steps < 0:
            raise ValueError("prompt_steps must be >= 1 and restorer_steps >= 0")
        self.loop.max_steps = self.trained_restorer_steps + self.prompt_steps

    @property
    def trained_restorer_steps(self) -> int:
        return 0 if self.medium_tier else self.restorer_steps

    def loader_phases(self) -> list[LoaderPhase]:
        """The training stream of each phase: the restorers' (when trained here), then the prompts'."""
        restorers = LoaderPhase(0, self.restorer_data.apply(self.data.train), "restorers")
        prompts = LoaderPhase(self.trained_restorer_steps, self.prompt_data.apply(self.data.train), "prompts")
        return ([restorers] if self.trained_restorer_steps else []) + [prompts]


@dataclass
class Stage2Config(JobConfig):
    """Stage 2. Without ``medium_tier`` L_dpl has only the degraded input as a negative (no hard
    negatives): a warning says so, and ``require_medium_tier`` (the paper profile) refuses it."""

    restorer: RestorerConfig = field(default_factory=RestorerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    perceiver: str = ""  # the stage-1 perceiver: a folder or an MLflow URI (runs:/<id>/perceiver, models:/...)
    medium_tier: Optional[str] = None  # the stage-1 fold restorers (hard negatives of L_dpl)
    require_medium_tier: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.perceiver:
            raise ValueError("stage 2 needs 'perceiver': the stage-1 product (a folder or runs:/<id>/perceiver)")
        if self.medium_tier:
            return
        if self.require_medium_tier:
            raise ValueError("this profile requires 'medium_tier' (require_medium_tier: true): the stage-1 fold "
                             "restorers (a folder or runs:/<id>/medium_tier) give L_dpl its hard negatives")
        if self.loss.l3:
            warnings.warn("stage 2 without 'medium_tier': L_dpl loses its hard negatives (the medium-tier outputs) "
                          "and contrasts against the degraded input only; set medium_tier=runs:/<stage-1 run>/"
                          "medium_tier", UserWarning, stacklevel=2)


def path_settings(cfg: JobConfig) -> dict[str, str]:
    """Every setting of a job that names a local file or folder, by its dotted key (storage URLs,
    ``file://`` URLs and MLflow URIs are not local paths here: they read the same from every node)."""
    found: dict[str, str] = {}
    for i, source in enumerate(cfg.data.train.sources):
        found[f"data.train.sources[{i}].location"] = source.location
    found["data.validation.source"] = cfg.data.validation.source
    found["engine.deepspeed_config"] = cfg.engine.deepspeed_config
    found["storage.path"] = cfg.storage.path
    for name in ("perceiver", "medium_tier"):
        found[name] = getattr(cfg, name, None)
    perceiver = getattr(cfg, "perceiver", None)
    if isinstance(perceiver, PerceiverConfig):
        found.update({"perceiver.clip_weights": perceiver.clip_weights, "perceiver.arch_config": perceiver.arch_config})
        found.pop("perceiver")
    for section in ("restorer", "loss"):
        if hasattr(cfg, section):
            found.update(_weight_files(to_dict(getattr(cfg, section)), section))
    return {key: value for key, value in found.items() if isinstance(value, str) and value and is_local_path(value)}


def _weight_files(tree, prefix: str) -> dict[str, str]:
    """``weights: <file>`` settings inside free-form component parameters."""
    found = {}
    if isinstance(tree, dict):
        for key, value in tree.items():
            if key == "weights" and isinstance(value, str):
                found[f"{prefix}.{key}"] = value
            else:
                found.update(_weight_files(value, f"{prefix}.{key}"))
    return found


def is_local_path(value: str) -> bool:
    return re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:/", value) is None  # not s3://, file://, runs:/, models:/ ...


def set_setting(cfg: JobConfig, key: str, value: str) -> None:
    """Set one of :func:`path_settings`' keys (``a.b[2].c`` and free-form parameter dicts)."""
    *parents, leaf = re.findall(r"[^.\[\]]+", key)
    target = cfg
    for part in parents:
        target = target[int(part)] if part.isdigit() else (
            target[part] if isinstance(target, dict) else getattr(target, part))
    if isinstance(target, dict):
        target[leaf] = value
    else:
        setattr(target, leaf, value)
