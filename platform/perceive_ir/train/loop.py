"""The training loop every worker runs: resume, stream, degrade, step, log, validate, checkpoint.

It knows nothing of Ray: checkpoints go through a :class:`Reporter` (Ray's ``train.report`` in
the orchestration package, a local folder in tests) and metrics through a tracker (MLflow on
rank 0, ``None`` elsewhere). Each rank calls the reporter at the same steps, as the collective
checkpoint requires.

At the start of every epoch (and once after a resume, mid-epoch or not) every rank calls
``task.on_epoch_start(engine, epoch, probe, resumed_mid_epoch)``; ``probe`` measures the model on
the fixed probe set (per degradation type) and gives every rank the same values (see :class:`ProbeSet`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Optional, Protocol

import numpy as np
import torch

from perceive_ir.data.pipeline import BatchPlan, LoaderConfig, LoaderPhase, ShardStream, build_loader
from perceive_ir.degrade import DegradationConfig, Degrader
from perceive_ir.eval.grid import save_grid
from perceive_ir.eval.metrics import psnr
from perceive_ir.eval.validation import HeldOutSet, ValidationConfig
from perceive_ir.train.checkpoint_index import Candidate, Selection, select_checkpoint, write_index
from perceive_ir.train.config import EngineConfig, LoopConfig, OptimizerConfig
from perceive_ir.train.engine import build_engine, deepspeed_settings, resolve_precision
from perceive_ir.train.elastic import has_portable_optimizer, load_portable_optimizer, resize_tag, save_portable_optimizer
from perceive_ir.train.state import CHECKPOINT_TAG, TrainState, load_state, read_state, save_state
from perceive_ir.train.steps import DegradedBatch, synthesize
from perceive_ir.weights import weight_identities

log = logging.getLogger(__name__)

__all__ = ["TrainingSettings", "Reporter", "Tracker", "LocalReporter", "ProbeSet", "draw_training_probe",
           "run_training"]


@dataclass
class TrainingSettings:
    loader: LoaderConfig
    degradation: DegradationConfig
    validation: ValidationConfig
    loop: LoopConfig
    optimizer: OptimizerConfig
    engine: EngineConfig
    # micro-batches per optimiser step, fixed for the run (see train.elastic); None: the launch's
    # world size x engine.gradient_accumulation_steps
    global_micro_batches: Optional[int] = None
    # save the size-independent optimizer state with every checkpoint, so that a launch at another
    # world size resumes it (the jobs always do)
    portable_optimizer: bool = False
    # the training stream by phase (stage 1: the restorers', then the prompts'); empty: ``loader`` throughout
    phases: list[LoaderPhase] = dataclasses.field(default_factory=list)


class _Phases:
    """The run's loader phases, each starting a new epoch: which one a step is in, its global batch,
    and the epoch number a step falls in (epochs are numbered across phases, so each phase's stream
    and degradations are its own)."""

    def __init__(self, settings: TrainingSettings, plan: BatchPlan, last_step: int) -> None:
        self.phases = settings.phases or [LoaderPhase(0, settings.loader)]
        starts = [p.first_step for p in self.phases]
        if starts[0] != 0 or starts != sorted(starts):
            raise ValueError(f"loader phases must start at step 0 and in order: {starts}")
        self.slots = plan.slots
        self.steps_per_epoch = [ShardStream(p.loader, plan=plan).steps_per_epoch for p in self.phases]
        ends = [p.first_step for p in self.phases[1:]] + [last_step]
        self.ends, self.first_epoch, epochs = ends, [], 0
        for phase, end, per_epoch in zip(self.phases, ends, self.steps_per_epoch):
            self.first_epoch.append(epochs)
            epochs += -(-max(end - phase.first_step, 0) // per_epoch)

    def index(self, step: int) -> int:
        return max(k for k, p in enumerate(self.phases) if p.first_step <= step)

    def global_batch(self, step: int) -> int:
        return self.slots * self.phases[self.index(step)].loader.batch_size

    def position(self, step: int) -> tuple[int, int, int]:
        """(phase index, epoch, step within the epoch) of ``step``."""
        k = self.index(step)
        epoch, start = divmod(step - self.phases[k].first_step, self.steps_per_epoch[k])
        return k, self.first_epoch[k] + epoch, start


class Reporter(Protocol):
    def latest(self) -> ContextManager[Selection]:
        """The newest intact checkpoint (see :func:`select_checkpoint`), copied locally while open."""

    def report(self, metrics: dict[str, Any], directory: str) -> None: ...

    def preemption_notice(self) -> bool:
        """Whether the cluster announced that a node of the run is about to go (a collective call)."""


class Tracker(Protocol):
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_file(self, path: str | Path, artifact_path: str | None = None) -> None: ...

    def log_folder(self, path: str | Path, artifact_path: str) -> None: ...

    def set_tags(self, tags: dict[str, str]) -> None: ...


class LocalReporter:
    """Checkpoints in ``folder/step_{n:08d}``, the last ``keep`` kept (single process, tests)."""

    def __init__(self, folder: str | Path, keep: int = 2) -> None:
        self.folder, self.keep = Path(folder), keep

    def _existing(self) -> list[Path]:
        return sorted(self.folder.glob("step_*")) if self.folder.is_dir() else []

    def latest(self) -> ContextManager[Selection]:
        return select_checkpoint(Candidate(p.name, lambda p=p: contextlib.nullcontext(str(p)))
                                 for p in reversed(self._existing()))

    def preemption_notice(self) -> bool:
        return False

    def report(self, metrics: dict[str, Any], directory: str) -> None:
        target = self.folder / f"step_{int(metrics['step']):08d}"
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(directory, target)
        for old in self._existing()[: -self.keep]:
            shutil.rmtree(old)


class ProbeSet:
    """The fixed probe set of L_dpl's reference rule, held by rank 0: the first samples of the training
    stream under their own seed, degraded as in training (paired sources keep their pairs), drawn once
    and the same at every epoch and launch; or the validation pairs.

    ``measure`` is collective: rank 0 writes its model's mean output PSNR per degradation type into
    ``into`` (every slot first takes the pooled mean; the last slot is the pooled mean) and every
    other rank receives the values by broadcast. Every rank must call it at the same point.
    """

    SEED_OFFSET = 7919  # the probe's stream: not the training stream's first samples themselves

    def __init__(self, held_out: HeldOutSet | None, world_size: int,
                 draw: Callable[[int], dict[str, tuple[torch.Tensor, torch.Tensor]]] | None = None) -> None:
        self.held_out, self.world_size, self._draw = held_out, world_size, draw
        self._drawn: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None

    def items(self, source: str, images: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]] | None:
        """``type -> (degraded, clean)`` on rank 0, None elsewhere."""
        if source == "validation" or self._draw is None:
            return self.held_out.items if self.held_out is not None else None
        if self._drawn is None:
            self._drawn = self._draw(images)
        return self._drawn

    def measure(self, restore: Callable[[torch.Tensor], torch.Tensor], into: torch.Tensor,
                slot_of: Callable[[str], int], source: str = "training", images: int = 64,
                chunk: int = 8) -> list[str]:
        """Fill ``into``; returns the types measured (rank 0; empty elsewhere)."""
        items = self.items(source, images)
        types: list[str] = []
        if items is not None:
            per_type = {kind: torch.cat([psnr(restore(d[i:i + chunk]).float().clamp(0, 1), c[i:i + chunk].float())
                                         for i in range(0, len(d), chunk)])
                        for kind, (d, c) in items.items()}
            pooled = torch.cat(list(per_type.values())).mean()
            into.fill_(pooled)
            for kind, values in per_type.items():
                into[slot_of(kind)] = values.mean()
            into[-1] = pooled
            types = list(per_type)
        if self.world_size > 1:
            torch.distributed.broadcast(into, src=0)
        return types


def draw_training_probe(loader: LoaderConfig, degrader: Degrader, device: torch.device,
                        images: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``images`` samples of the training stream (its sources at their shares, under the probe's seed),
    degraded as in training, grouped by degradation type."""
    cfg = dataclasses.replace(loader, batch_size=images, samples_per_epoch=images, num_workers=0, flips=False,
                              seed=loader.seed + ProbeSet.SEED_OFFSET)
    batch = next(iter(build_loader(cfg, rank=0, world_size=1)))
    drawn = synthesize(degrader, batch, epoch=0, device=device)
    groups: dict[str, list[int]] = {}
    for i, kind in enumerate(drawn.types):
        groups.setdefault(kind, []).append(i)
    return {kind: (drawn.degraded[idx], drawn.clean[idx]) for kind, idx in groups.items()}


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _lr_metrics(scheduler, names: list[str]) -> dict[str, float]:
    return {f"lr/{name}": lr for name, lr in zip(names, scheduler.get_last_lr())}


def run_training(task, settings: TrainingSettings, reporter: Reporter, tracker: Tracker | None,
                 rank: int, world_size: int, device: torch.device) -> TrainState:
    """Train until ``loop.last_step``; returns the final state. ``task`` is a stage task
    (``perceive_ir.train.tasks``)."""
    cfg = settings.loop
    slots = settings.global_micro_batches or world_size * settings.engine.gradient_accumulation_steps
    plan = BatchPlan.for_rank(slots, rank, world_size)
    accumulation = plan.per_rank
    phases = _Phases(settings, plan, cfg.last_step)
    ds_settings = deepspeed_settings(settings.engine, settings.loader.batch_size, world_size, device, accumulation)
    dtype = torch.bfloat16 if resolve_precision(settings.engine, device) == "bf16" else torch.float32
    _seed_everything(cfg.seed * 1000 + rank)
    engine, scheduler = build_engine(task.model.to(device), task.param_groups(), task.schedule_factors(),
                                     settings.optimizer, ds_settings)
    state = TrainState(world_size=world_size, global_batch=phases.global_batch(0))
    load_started = time.perf_counter()
    with reporter.latest() as selection:
        checkpoint = selection.directory
        if checkpoint is not None:
            saved = _resume(engine, scheduler, checkpoint, world_size, phases.global_batch)
            state = load_state(checkpoint, rank, world_size)
            log.info("rank %d resumed at step %d from %s (written by %d workers)", rank, state.step, checkpoint,
                     saved.world_size)
    load_s = time.perf_counter() - load_started
    previous = dataclasses.replace(state)
    state.world_size, state.global_batch, state.preempted = world_size, phases.global_batch(state.step), False
    if tracker is not None:
        _log_launch(tracker, previous, state, checkpoint is not None, accumulation, len(selection.rejected), load_s)
    if tracker is not None:
        _log_weight_identities(task.model, tracker)

    degrader = Degrader(settings.degradation)
    held_out = None
    if rank == 0:
        held_out = HeldOutSet(settings.validation, settings.loader.sources[0].location,
                              settings.loader.storage_options).to(device)
    probe = ProbeSet(held_out, world_size,
                     (lambda images: draw_training_probe(settings.loader, degrader, device, images)) if rank == 0 else None)
    last = cfg.last_step
    window: dict[str, Any] = {"terms": {}, "count": 0, "skipped": 0, "steps": 0, "start": time.perf_counter()}
    saved_at = -1
    preemption = {"notice": False}
    restart = {"since": previous.saved_unix if checkpoint is not None and previous.saved_unix > 0 else None}

    def checkpoint_now(metrics: dict[str, Any], preempted: bool = False) -> None:
        nonlocal saved_at
        with tempfile.TemporaryDirectory(prefix="ckpt-") as directory:
            engine.save_checkpoint(directory, tag=CHECKPOINT_TAG)
            if settings.portable_optimizer:
                save_portable_optimizer(engine, directory, rank)
            state.preempted, state.saved_unix = preempted or preemption["notice"], time.time()
            save_state(directory, state, rank)
            write_index(directory, rank, world_size, state.step)  # last: its presence means complete
            reporter.report({"step": state.step, **metrics}, directory)
        saved_at = state.step

    def log_window() -> dict[str, float]:
        # Means over the global batches of the window (every rank's micro-batches), so a run logs the
        # same losses at any world size; one collective on the training device per logged step.
        names = sorted(window["terms"])
        totals = torch.stack([torch.as_tensor(window["terms"][k], device=device).float().reshape(()) for k in names]
                             + [torch.tensor(float(window["count"]), device=device),
                                torch.tensor(float(window["skipped"]), device=device)])
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(totals)
        values = totals.tolist()
        count, skipped = max(values[-2], 1.0), values[-1]
        elapsed = max(time.perf_counter() - window["start"], 1e-9)
        metrics = {f"train/{k}": v / count for k, v in zip(names, values)}
        metrics.update(_lr_metrics(scheduler, task.group_names))
        metrics["samples_per_s"] = window["steps"] * state.global_batch / elapsed
        metrics["skipped_samples"] = skipped
        metrics.update(task.live_metrics())
        window.update(terms={}, count=0, skipped=0, steps=0, start=time.perf_counter())
        return metrics

    engine.train()
    while state.step < last:
        k, epoch, start = phases.position(state.step)
        loader, phase_end = phases.phases[k].loader, phases.ends[k]
        if state.global_batch != phases.global_batch(state.step):  # a new phase with its own batch size
            state.global_batch = phases.global_batch(state.step)
            if tracker is not None:
                tracker.log_metrics({"train/global_batch": float(state.global_batch)}, step=state.step)
        if start == 0 and len(phases.phases) > 1 and state.step == phases.phases[k].first_step:
            log.info("rank %d: phase %d from step %d: %d px crops, %d per micro-batch, weighting %s", rank, k,
                     state.step, loader.patch_size, loader.batch_size, loader.weighting)
        task.on_epoch_start(engine, epoch, probe, resumed_mid_epoch=start > 0)
        step_batches: list[DegradedBatch] = []
        for batch in build_loader(loader, epoch=epoch, start_step=start, plan=plan):
            window["skipped"] += int(batch["skipped"])
            step_batches.append(synthesize(degrader, batch, epoch, device, dtype))
            if len(step_batches) < accumulation:
                continue
            # the step's micro-batches are all at hand: a task whose loss spans the global batch
            # (L_cl's negatives) prepares it before the first of them
            prepare = getattr(task, "prepare_step", None)
            if prepare is not None and accumulation > 1:
                prepare(engine, step_batches, plan)
            for degraded in step_batches:
                terms = task.compute(engine, degraded, state.step)
                engine.backward(terms["total"])
                engine.step()
                for k, v in terms.items():  # summed on the device: no host sync per step
                    window["terms"][k] = window["terms"].get(k, 0.0) + v.detach().float()
                window["count"] += 1
            step_batches = []
            state.step += 1
            state.samples += state.global_batch
            window["steps"] += 1
            _maybe_fail(cfg, state.step, rank, tracker)
            metrics: dict[str, float] = {}
            if state.step % cfg.log_every == 0 or state.step == last:
                metrics = log_window()
                if tracker is not None:
                    tracker.log_metrics(metrics, step=state.step)
            if restart["since"] is not None and tracker is not None:  # the first step after a resume
                tracker.log_metrics({"elastic/restart_lost_s": time.time() - restart["since"]}, step=state.step)
            restart["since"] = None
            validation: dict[str, float] = {}
            if state.step % cfg.val_every == 0 or state.step == cfg.max_steps:
                state.validations += 1
                if rank == 0:
                    validation = _validate(task, engine, held_out, tracker, state, cfg)
            scheduled = state.step % cfg.checkpoint_every == 0 or state.step == last
            preempted = not scheduled and _preemption_announced(reporter, cfg, state.step, preemption)
            if scheduled or preempted:
                # the validation of this step travels with the checkpoint's report (a search's scheduler
                # reads it there, not back from the tracking store)
                checkpoint_now({**{k: v for k, v in metrics.items() if k.startswith("train/")}, **validation},
                               preempted)
            if state.step >= min(last, phase_end):
                break
    if saved_at != state.step:  # relaunched at the end: nothing trained, report for symmetry
        checkpoint_now({})
    if state.step >= cfg.max_steps and rank == 0:
        with tempfile.TemporaryDirectory(prefix="products-") as folder:
            products = task.save_products(engine.module, Path(folder))
            if tracker is not None:
                for name, path in products.items():
                    tracker.log_folder(path, name)
    return state


def _resume(engine, scheduler, checkpoint: str, world_size: int, global_batch_at: Callable[[int], int]) -> TrainState:
    """Load ``checkpoint`` into the engine; at another world size through the portable optimizer state.
    ``global_batch_at``: this launch's samples per step at a step (phases may differ)."""
    saved = read_state(checkpoint)
    global_batch = global_batch_at(max(saved.step - 1, 0))  # the batch of the step that wrote it
    if saved.global_batch and saved.global_batch != global_batch:
        raise ValueError(f"checkpoint '{checkpoint}' was trained with a global batch of {saved.global_batch} "
                         f"samples, this launch makes {global_batch}: resuming would change the experiment")
    if saved.world_size == world_size:
        path, _ = engine.load_checkpoint(checkpoint, tag=CHECKPOINT_TAG, load_module_strict=True)
        if path is None:
            raise FileNotFoundError(f"checkpoint '{checkpoint}' has no DeepSpeed state under '{CHECKPOINT_TAG}'")
        return saved
    if not has_portable_optimizer(checkpoint):
        raise ValueError(f"checkpoint '{checkpoint}' was written by {saved.world_size} workers without a portable "
                         f"optimizer state (an older version of the trainer), and DeepSpeed's sharded state needs "
                         f"the same number: relaunch with ray.num_workers={saved.world_size}")
    path, _ = engine.load_checkpoint(checkpoint, tag=CHECKPOINT_TAG, load_module_strict=True,
                                     load_module_only=True)
    if path is None:
        raise FileNotFoundError(f"checkpoint '{checkpoint}' has no DeepSpeed state under '{CHECKPOINT_TAG}'")
    load_portable_optimizer(engine, scheduler, checkpoint, saved.step)
    return saved


def _log_launch(tracker: Tracker, previous: TrainState, state: TrainState, resumed: bool, accumulation: int,
                broken_skipped: int, load_s: float) -> None:
    """Where this launch starts, at how many workers; a tag when that number changed."""
    metrics = {"train/world_size": float(state.world_size), "train/global_batch": float(state.global_batch),
               "train/accumulation": float(accumulation)}
    if resumed:
        metrics.update({"resumed_from_step": float(state.step), "checkpoint/broken_skipped": float(broken_skipped),
                        "elastic/checkpoint_load_s": load_s})
    tracker.log_metrics(metrics, step=state.step)
    if resumed and previous.world_size != state.world_size:
        key, value = resize_tag(previous.world_size, state.world_size, state.step, previous.preempted)
        log.warning("resized: %s", value)
        tracker.set_tags({key: value})


def _validate(task, engine, held_out: HeldOutSet, tracker: Tracker | None, state: TrainState,
              cfg: LoopConfig) -> dict[str, float]:
    engine.eval()
    try:
        metrics, outputs = task.validate(engine.module, held_out)
    finally:
        engine.train()
    metrics = {k: float(v) for k, v in metrics.items()}
    if tracker is None:
        return metrics
    tracker.log_metrics(metrics, step=state.step)
    if state.validations % cfg.grid_every_validations == 0:
        with tempfile.TemporaryDirectory(prefix="grid-") as folder:
            grid = save_grid(Path(folder) / f"validation_step{state.step:08d}.png", held_out, outputs)
            tracker.log_file(grid, "validation_grids")
    return metrics


def _log_weight_identities(model: torch.nn.Module, tracker: Tracker) -> None:
    """``weights/weight_identities.json``: the sha256 of every pretrained file the model was built from."""
    identities = weight_identities(model)
    if not identities:
        return
    with tempfile.TemporaryDirectory(prefix="weights-") as folder:
        path = Path(folder) / "weight_identities.json"
        path.write_text(json.dumps(identities, indent=2, sort_keys=True))
        tracker.log_file(path, "weights")


def _preemption_announced(reporter: Reporter, cfg: LoopConfig, step: int, handled: dict[str, bool]) -> bool:
    """Every ``preemption_check_every`` steps (on every rank: the check is collective), whether a new
    preemption notice calls for a checkpoint now; a notice stays up, so it is answered once."""
    if not cfg.preemption_check_every or step % cfg.preemption_check_every:
        return False
    if not reporter.preemption_notice() or handled["notice"]:
        return False
    handled["notice"] = True
    log.warning("preemption announced: checkpoint at step %d", step)
    return True


def _maybe_fail(cfg: LoopConfig, step: int, rank: int, tracker: Tracker | None = None) -> None:
    """Die once at each configured step, on the configured rank (recovery drills). What the rank
    logged is written first, so a drill loses no metric point."""
    injection = cfg.failure_injection
    if injection.rank != rank or not injection.marker:
        return
    markers = {n: Path(f"{injection.marker}.step{n}") for n in injection.at_steps}
    if injection.at_step is not None:
        markers[injection.at_step] = Path(injection.marker)
    marker = markers.get(step)
    if marker is None or marker.exists():
        return
    close = getattr(tracker, "close", None)
    if close is not None:
        close()
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"worker {rank} stopped at step {step}\n")
    log.warning("failure injection: rank %d exits at step %d", rank, step)
    os._exit(1)
