"""The DeepSpeed engine of a worker: settings from a JSON file under configs/deepspeed/, filled in
from the job (batch sizes, accumulation, clipping, precision), torch's fused AdamW (nothing to
compile) and the warm-up + cosine schedule. Checkpoints are read back without executing code.

Under bf16 DeepSpeed casts every parameter of the module it is given; the frozen networks marked
by ``models.precision.keep_fp32`` (VGG-16, the CLIP towers, DINOv2) get their fp32 weights back
right after, and checkpoints leave out those built from weight files (:class:`FrozenOutOfCheckpoints`)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

import torch

from perceive_ir.config import ConfigError
from perceive_ir.models.precision import fp32_kept, rebuilt_parameter_names
from perceive_ir.train.config import EngineConfig, OptimizerConfig
from perceive_ir.train.schedule import build_scheduler

log = logging.getLogger(__name__)

__all__ = ["resolve_precision", "deepspeed_settings", "build_engine", "init_distributed", "SafeCheckpointEngine",
           "FrozenOutOfCheckpoints", "make_optimizer"]


def resolve_precision(cfg: EngineConfig, device: torch.device) -> str:
    if cfg.precision != "auto":
        return cfg.precision
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"  # DeepSpeed's CPU path has no fp16, and bf16 matmuls are slow on most CPUs


def deepspeed_settings(cfg: EngineConfig, micro_batch: int, world_size: int, device: torch.device,
                       accumulation: int | None = None) -> dict[str, Any]:
    """``accumulation``: micro-batches per rank and step (default: ``cfg.gradient_accumulation_steps``)."""
    path = Path(cfg.deepspeed_config)
    if not path.is_file():
        raise ConfigError(f"DeepSpeed config file '{path}' (from 'engine.deepspeed_config', "
                          f"relative to {os.getcwd()}) does not exist")
    try:
        settings = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"DeepSpeed config file '{path}' is not valid JSON: {err}") from None
    accumulation = accumulation or cfg.gradient_accumulation_steps
    settings.update(
        train_micro_batch_size_per_gpu=micro_batch,
        gradient_accumulation_steps=accumulation,
        train_batch_size=micro_batch * accumulation * world_size,
        gradient_clipping=cfg.gradient_clipping,
    )
    settings.pop("fp16", None)
    bf16 = resolve_precision(cfg, device) == "bf16"
    settings["bf16"] = {"enabled": bf16}
    zero = settings.setdefault("zero_optimization", {})
    if cfg.zero_stage is not None:
        zero["stage"] = cfg.zero_stage
    if zero.get("stage", 0) == 3:
        # the products are written from each rank's full copy of the weights (ZeRO <= 2)
        raise ConfigError(f"ZeRO stage 3 (from '{path}' or 'engine.zero_stage') is not supported: use stage 0, 1 or 2")
    if world_size == 1 and not bf16 and zero.get("stage", 0) > 0:
        # One rank has nothing to partition, and ZeRO's per-parameter gradient bookkeeping costs
        # several percent of a small model's step. (In bf16, stage 0 would accumulate gradients in
        # bf16, so it keeps its stage.) A resize resumes through the portable optimizer state,
        # which does not depend on the stage.
        log.info("one worker in fp32: ZeRO stage %d -> 0 (nothing to partition)", zero["stage"])
        zero["stage"] = 0
    settings.setdefault("steps_per_print", 1 << 30)
    settings.setdefault("wall_clock_breakdown", False)
    return settings


def init_distributed(device: torch.device) -> None:
    """Join (or, alone, create) the process group; DeepSpeed reuses an existing one."""
    import deepspeed

    backend = "nccl" if device.type == "cuda" else "gloo"
    if not torch.distributed.is_initialized():
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29533")
    deepspeed.init_distributed(dist_backend=backend, dist_init_required=None)


def _deepspeed_safe_globals() -> list:
    """The plain-data classes DeepSpeed writes into its checkpoints (no code runs on load)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


class SafeCheckpointEngine:
    """DeepSpeed's torch checkpoint engine, but loading with ``weights_only=True``."""

    @staticmethod
    def wrap(engine) -> None:
        inner = engine.checkpoint_engine
        allowed = _deepspeed_safe_globals()

        def load(path: str, map_location=None):
            try:
                with torch.serialization.safe_globals(allowed):
                    return torch.load(path, map_location=map_location, weights_only=True)
            except Exception as err:  # noqa: BLE001 - name the file in the error
                raise ValueError(f"checkpoint file '{path}' is not loadable with weights_only=True: {err}") from None

        inner.load = load


class FrozenOutOfCheckpoints:
    """Checkpoints without the frozen networks built from pretrained weight files (VGG-16, the CLIP
    towers, DINOv2: most of a checkpoint's size, in fp32): every launch rebuilds them from those
    files. Loading keeps the module's own values of them, also over an older checkpoint that holds
    them (in bf16). Randomly initialised frozen networks (tiny test profiles) and the frozen
    products (medium tier, stage 2's prompts) stay in the checkpoints. Under ZeRO 2 DeepSpeed's
    second copy of every frozen parameter (its ``frozen_param_fragments``) is left out."""

    @classmethod
    def wrap(cls, engine) -> None:
        save, module_state, load_module = engine.save_checkpoint, engine.module_state_dict, engine.load_module_state_dict
        # every name of a shared network (the perceiver serves L_clip and L_dpl)
        rebuilt = rebuilt_parameter_names(engine.module)

        def save_checkpoint(save_dir, tag=None, client_state={}, save_latest=True, exclude_frozen_parameters=True):
            return save(save_dir, tag=tag, client_state=client_state, save_latest=save_latest,
                        exclude_frozen_parameters=exclude_frozen_parameters)

        def module_state_dict(destination=None, prefix="", keep_vars=False, exclude_frozen_parameters=False):
            state = module_state(destination=destination, prefix=prefix, keep_vars=keep_vars)
            if exclude_frozen_parameters:
                for name in rebuilt:
                    state.pop(prefix + name, None)
            return state

        def load_module_state_dict(checkpoint, strict=True, **kwargs):
            own = engine.module.state_dict()
            kept = {name: own[name] for name in rebuilt if name in own}
            return load_module({**checkpoint, "module": {**checkpoint["module"], **kept}}, strict=strict, **kwargs)

        engine.save_checkpoint = save_checkpoint
        engine.module_state_dict = module_state_dict
        engine.load_module_state_dict = load_module_state_dict


def _broadcast_kept(tensors: list[torch.Tensor]) -> None:
    """Rank 0's fp32 frozen weights on every rank, as DeepSpeed's init does for the rest."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    if torch.distributed.get_world_size() > 1:
        for tensor in tensors:
            torch.distributed.broadcast(tensor.data, src=0)


def make_optimizer(param_groups: list[dict], optim: OptimizerConfig) -> torch.optim.AdamW:
    """AdamW with torch's fused kernel where every parameter allows it (CPU and CUDA floating point):
    one pass over each tensor instead of a dozen, several times faster than the default loop on the CPU."""
    params = [p for group in param_groups for p in group["params"]]
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(param_groups, lr=optim.lr, betas=tuple(optim.betas),
                             weight_decay=optim.weight_decay, fused=fused or None)


def build_engine(
    model: torch.nn.Module,
    param_groups: list[dict],
    factors: list[Callable[[int], float]],
    optim: OptimizerConfig,
    settings: dict[str, Any],
):
    """``(engine, scheduler)``: ``engine.step()`` also advances the schedule."""
    import deepspeed

    optimizer = make_optimizer(param_groups, optim)
    scheduler = build_scheduler(optimizer, factors)
    with fp32_kept(model) as kept:  # DeepSpeed's bf16 cast does not reach the marked frozen networks
        engine, _, _, scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=settings, dist_init_required=False
        )
    _broadcast_kept([t for t in kept if isinstance(t, torch.nn.Parameter)])
    SafeCheckpointEngine.wrap(engine)
    FrozenOutOfCheckpoints.wrap(engine)
    return engine, scheduler
