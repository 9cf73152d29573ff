"""What each Ray Train worker runs: rebuild the config, the stage task and the loop, report through Ray."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from perceive_ir.config import from_dict
from perceive_ir.orchestration.config import JobConfig, Stage1Config, Stage2Config
from perceive_ir.train.engine import init_distributed
from perceive_ir.train.loop import TrainingSettings, run_training
from perceive_ir.data.node_cache import node_cache

log = logging.getLogger(__name__)

__all__ = ["RayReporter", "train_worker", "build_task", "training_settings"]

CONFIGS = {"stage1": Stage1Config, "stage2": Stage2Config}


class RayReporter:
    """Checkpoints through ``ray.train.report``: every worker reports its own DeepSpeed shard folder,
    Ray merges them into one checkpoint in the run's storage and keeps the last K.

    On resume the checkpoint Ray hands back is verified against its index; when it is broken the
    older ones kept beside it in the run's storage are tried, newest first."""

    def latest(self):
        import ray.train

        from perceive_ir.train.checkpoint_index import select_checkpoint

        return select_checkpoint(_kept_checkpoints(ray.train.get_checkpoint()))

    def report(self, metrics: dict[str, Any], directory: str) -> None:
        import ray.train

        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))

    def preemption_notice(self) -> bool:
        import ray.train

        return ray.train.get_preemption_info() is not None


def _kept_checkpoints(latest):
    """The candidates to resume from: Ray's latest checkpoint, then the older ``checkpoint_*``
    folders beside it in the run's storage (Ray names them by time), newest first."""
    import posixpath

    import pyarrow.fs
    import ray.train

    from perceive_ir.train.checkpoint_index import Candidate

    if latest is None:
        return
    yield Candidate(posixpath.basename(latest.path), lambda: _private_copy(latest))
    parent, name = posixpath.split(latest.path.rstrip("/"))
    entries = latest.filesystem.get_file_info(pyarrow.fs.FileSelector(parent))
    older = sorted((e.path for e in entries if e.type == pyarrow.fs.FileType.Directory
                    and e.base_name.startswith("checkpoint_") and e.base_name < name), reverse=True)
    for path in older:
        checkpoint = ray.train.Checkpoint(path, filesystem=latest.filesystem)
        yield Candidate(posixpath.basename(path), lambda c=checkpoint: _private_copy(c))


@contextlib.contextmanager
def _private_copy(checkpoint):
    # A private copy per worker: ``as_directory`` shares one folder between the workers of a
    # node, and one worker leaving it can remove files another is still reading.
    with tempfile.TemporaryDirectory(prefix="resume-") as directory:
        checkpoint.to_directory(directory)
        yield directory


def training_settings(cfg: JobConfig) -> TrainingSettings:
    phases = cfg.loader_phases() if isinstance(cfg, Stage1Config) else []
    return TrainingSettings(cfg.data.train, cfg.data.degradation, cfg.data.validation, cfg.loop,
                            cfg.optimizer, cfg.engine, global_micro_batches=cfg.global_micro_batches,
                            portable_optimizer=True,  # every checkpoint resumable at another world size
                            phases=phases)


def _with_staged_inputs(cfg: JobConfig, staged: dict[str, dict[str, Any]]) -> JobConfig:
    """``cfg`` reading the products the driver staged in the run storage instead of their MLflow URIs."""
    if not staged:
        return cfg
    from perceive_ir.orchestration.staging import staged_folder
    from perceive_ir.orchestration.storage import run_storage

    _, filesystem = run_storage(cfg.storage)
    return dataclasses.replace(cfg, **{key: str(staged_folder(entry, filesystem)) for key, entry in staged.items()})


def build_task(stage: str, cfg: JobConfig, tracking_uri: str | None, cache: Path):
    """The stage task, with its inputs resolved (products downloaded from MLflow when given as URIs:
    a job's workers get folders the driver staged, see :mod:`perceive_ir.orchestration.staging`)."""
    from perceive_ir.products import (
        ensure_clip_weights,
        load_medium_tier,
        load_perceiver,
        medium_tier_generator,
        resolve_product,
    )
    from perceive_ir.train.tasks import Stage1Task, Stage2Task

    if stage == "stage1":
        assert isinstance(cfg, Stage1Config)
        perceiver_cfg = ensure_clip_weights(cfg.perceiver, cfg.clip_init_seed, cache / "clip")
        if cfg.medium_tier:
            folder = resolve_product(cfg.medium_tier, "medium tier", "medium_tier", tracking_uri)
            restorers, restorer_cfg = load_medium_tier(folder)
        else:
            restorer_cfg, restorers = cfg.restorer, [cfg.restorer.build() for _ in range(cfg.folds)]
        return Stage1Task(restorer_cfg, restorers, not cfg.medium_tier, perceiver_cfg, cfg.optimizer,
                          cfg.prompt_lr, cfg.restorer_steps, cfg.prompt_steps)
    assert isinstance(cfg, Stage2Config)
    perceiver = load_perceiver(resolve_product(cfg.perceiver, "perceiver", "perceiver", tracking_uri))
    medium = None
    if cfg.medium_tier:
        medium = medium_tier_generator(resolve_product(cfg.medium_tier, "medium tier", "medium_tier", tracking_uri))
    return Stage2Task(cfg.restorer, cfg.loss, perceiver, medium, cfg.optimizer, cfg.loop.max_steps)


def job_root() -> Path | None:
    """The job's working folder (the uploaded repository). Ray puts it first on PYTHONPATH, while
    Ray Train moves the worker into a scratch folder; relative paths of the config need the former."""
    for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep):
        path = Path(entry)
        if path.is_absolute() and (path / "configs").is_dir():
            return path
    return None


def train_worker(payload: dict[str, Any]) -> None:
    """Ray Train's ``train_loop_per_worker``."""
    import ray.train
    import ray.train.torch

    logging.basicConfig(level=logging.INFO)
    root = job_root()
    if root is not None:
        os.chdir(root)
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    stage = payload["stage"]
    cfg = from_dict(CONFIGS[stage], payload["config"], f"{stage} job config")
    device = ray.train.torch.get_device()
    torch.set_num_threads(max(1, int(payload.get("threads_per_worker", 1))))
    init_distributed(device)
    from perceive_ir.tracking import RunTracker

    # Rank 0 logs through a background buffer: training goes on while the store is away.
    tracker = RunTracker(payload["tracking_uri"], payload["run_id"], cfg.tracking, background=True) if rank == 0 else None
    cache = node_cache()
    try:
        torch.manual_seed(cfg.loop.seed)  # the models' initial weights: the same in every launch
        task = build_task(stage, _with_staged_inputs(cfg, payload.get("staged") or {}), payload["tracking_uri"], cache)
        state = run_training(task, training_settings(cfg), RayReporter(), tracker, rank, world_size, device)
    except BaseException:
        if tracker is not None:  # a restart resumes from the last checkpoint: write what can be written
            with contextlib.suppress(Exception):
                tracker.close(timeout_s=min(30.0, cfg.tracking.drain_timeout_s))
        raise
    if tracker is not None:
        tracker.close()  # the run's status and its products' registration follow: wait for the store
    log.info("rank %d finished at step %d", rank, state.step)
