"""Typed configuration of a batch restoration (``configs/restore.yaml``, ``jobs/restore.py``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from perceive_ir.eval.inference import InferenceConfig
from perceive_ir.tracking import TrackingConfig

__all__ = ["RestoreRaySettings", "RestoreConfig", "STATE_FOLDER"]

# The job's own files beside the restored images: records, report, summary (never an input image).
STATE_FOLDER = "_restore"


@dataclass
class RestoreRaySettings:
    address: Optional[str] = None  # None: the cluster of a submitted job, else a new local Ray
    actors: int = 1  # restoration actors, each holding the restorer (and the perceiver)
    use_gpu: bool = False  # one GPU per actor
    actor_cpus: float = 1.0  # CPUs reserved by each actor (its torch threads)
    local_cpus: Optional[int] = None  # CPUs of a new local Ray (None: all)
    local_object_store_mb: Optional[int] = None  # object store of a new local Ray (None: Ray's default)
    # Decoded and restored pixels waiting between the stages, over all of them: Ray Data's streaming
    # executor holds back reading and decoding when this much is in flight (the job's memory bound)
    in_flight_mb: int = 512

    def __post_init__(self) -> None:
        if self.actors < 1:
            raise ValueError(f"ray.actors must be >= 1, got {self.actors}")
        if self.actor_cpus <= 0:
            raise ValueError(f"ray.actor_cpus must be > 0, got {self.actor_cpus}")
        if self.in_flight_mb < 16:
            raise ValueError(f"ray.in_flight_mb must be >= 16, got {self.in_flight_mb}")


@dataclass
class RestoreConfig:
    model: str = ""  # models:/NAME-restorer@champion, models:/NAME/<n>, runs:/<id>/restorer or a folder
    input: str = ""  # a folder or an fsspec URL (s3://bucket/prefix): every image below it
    output: str = ""  # a folder or URL: the restored images at the inputs' relative paths, in their formats
    # The quality scorer: "" the pair's perceiver (the version the restorer was trained against, else
    # models:/<base>-perceiver@champion); "none": no scores; or a URI / folder
    perceiver: str = ""
    target: Optional[str] = None  # references at the inputs' relative paths (any supported format): PSNR/SSIM
    storage_options: dict[str, Any] = field(default_factory=dict)  # e.g. {endpoint_url: ...}; no secrets
    jpeg_quality: int = 95
    webp_quality: int = 95
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    batch_images: int = 4  # images handed to an actor at once; those of one size are restored together
    batch_pixels: int = 4_194_304  # at most this many pixels restored in one forward pass
    decode_batch: int = 4  # images read and decoded by one task
    ray: RestoreRaySettings = field(default_factory=RestoreRaySettings)
    tracking: TrackingConfig = field(default_factory=lambda: TrackingConfig(experiment="perceive-ir-restore"))
    run_name: str = ""  # the MLflow run: "" restore-<output folder name>; a relaunch continues it
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("jpeg_quality", "webp_quality"):
            if not 1 <= getattr(self, name) <= 100:
                raise ValueError(f"{name} must be 1..100, got {getattr(self, name)}")
        for name in ("batch_images", "batch_pixels", "decode_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.inference.precision == "bf16" and not self.ray.use_gpu:
            raise ValueError("inference.precision=bf16 is for GPUs (ray.use_gpu=true); CPUs restore in fp32")
