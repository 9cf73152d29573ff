"""What lets a run change its number of workers between two launches and stay the same experiment.

- The global batch is fixed (``global_micro_batches`` micro-batches of the loader's batch size);
  each size ``W`` that divides it trains with ``global_micro_batches / W`` accumulation steps.
- DeepSpeed's ZeRO 1/2 optimizer state is sharded by data-parallel rank and refuses another rank
  count. Every checkpoint therefore also holds a portable copy: the full fp32 weights and Adam
  moments of every trained parameter, by name, in safetensors (``optimizer_portable.*``). A launch
  at another size loads the weights from DeepSpeed's checkpoint, then every rank takes its own
  fragments of the moments through DeepSpeed's public ``safe_set_full_*`` helpers. ZeRO 0 keeps
  whole moments per parameter, which the same files carry.
- The learning-rate schedule is a function of the optimiser step, restored from the counters.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Optional

import torch

from perceive_ir.data.pipeline import divisors

log = logging.getLogger(__name__)

__all__ = ["global_micro_batches", "check_sizes", "save_portable_optimizer", "load_portable_optimizer",
           "has_portable_optimizer", "resize_reason", "PORTABLE_WEIGHTS"]

PORTABLE_WEIGHTS = "optimizer_portable.safetensors"
PORTABLE_META = "optimizer_portable.json"
MOMENTS = ("exp_avg", "exp_avg_sq")


def global_micro_batches(micro_batch: int, accumulation: int, max_workers: int, global_batch: Optional[int]) -> int:
    """Micro-batches per optimiser step: ``global_batch / micro_batch`` when the global batch is
    given, else what ``max_workers`` ranks with ``accumulation`` steps each make."""
    if global_batch is None:
        return accumulation * max_workers
    if global_batch % micro_batch:
        raise ValueError(f"engine.global_batch {global_batch} is not a multiple of the micro-batch "
                         f"(data.train.batch_size) {micro_batch}")
    return global_batch // micro_batch


def check_sizes(slots: int, micro_batch: int, sizes: range) -> None:
    """Refuse a worker range holding a size that cannot share the global batch evenly."""
    bad = [w for w in sizes if slots % w]
    if bad:
        fit = [w for w in divisors(slots) if w in sizes]
        raise ValueError(
            f"a global batch of {slots * micro_batch} ({slots} micro-batches of {micro_batch}) cannot be shared "
            f"evenly by {bad} workers; worker counts in range that can: {fit or 'none'}. Change ray.num_workers, "
            f"or set engine.global_batch to a multiple of {micro_batch} x every count in range")


def _base_optimizer(engine) -> torch.optim.Optimizer:
    optimizer = engine.optimizer
    return getattr(optimizer, "optimizer", optimizer)  # ZeRO wraps the torch optimiser


def _trained(engine) -> list[tuple[str, torch.nn.Parameter]]:
    return [(name, p) for name, p in engine.module.named_parameters() if p.requires_grad]


def _full_state(engine, param: torch.nn.Parameter, key: str) -> Optional[torch.Tensor]:
    """The full tensor of a parameter's fp32 master (key ``fp32``) or Adam moment, on every rank
    (a collective under ZeRO)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    if hasattr(param, "_hp_mapping"):
        return safe_get_full_fp32_param(param) if key == "fp32" else safe_get_full_optimizer_state(param, key)
    if key == "fp32":
        return param.detach().float()
    state = _base_optimizer(engine).state.get(param, {})
    return state.get(key)


def _adam_step(engine) -> float:
    for state in _base_optimizer(engine).state.values():
        if "step" in state:
            step = state["step"]
            return float(step.item() if torch.is_tensor(step) else step)
    return 0.0


def save_portable_optimizer(engine, directory: str | Path, rank: int) -> None:
    """Every rank takes part; rank 0 writes the files."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    for name, param in _trained(engine):
        for key in ("fp32", *MOMENTS):
            value = _full_state(engine, param, key)
            if value is not None and rank == 0:
                tensors[f"{name}::{key}"] = value.detach().to("cpu", torch.float32).contiguous()
    if rank == 0:
        save_file(tensors, str(Path(directory) / PORTABLE_WEIGHTS))
        (Path(directory) / PORTABLE_META).write_text(json.dumps({"adam_step": _adam_step(engine)}))


def has_portable_optimizer(directory: str | Path) -> bool:
    return (Path(directory) / PORTABLE_WEIGHTS).is_file() and (Path(directory) / PORTABLE_META).is_file()


def load_portable_optimizer(engine, scheduler, directory: str | Path, step: int) -> None:
    """Into an engine whose module weights were loaded from the checkpoint: fp32 masters, moments,
    Adam's step count and the schedule's position (``step`` optimiser steps done)."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state
    from safetensors.torch import load_file

    saved = load_file(str(Path(directory) / PORTABLE_WEIGHTS))
    adam_step = json.loads((Path(directory) / PORTABLE_META).read_text())["adam_step"]
    base = _base_optimizer(engine)
    missing = [name for name, _ in _trained(engine) if f"{name}::exp_avg" not in saved]
    if missing:
        raise ValueError(f"checkpoint '{directory}': no portable optimizer state for {missing[:5]} "
                         f"({len(missing)} parameters): was it written by another model?")
    # Adam's state is created at the first step; a fresh engine has none yet. Create it (zeros, the
    # step count) for every tensor the optimiser updates (ZeRO's flat partitions, or the parameters),
    # then let DeepSpeed link each parameter's fragments to it.
    for group in base.param_groups:
        for tensor in group["params"]:
            state = base.state.setdefault(tensor, {})
            for key in MOMENTS:
                state.setdefault(key, torch.zeros_like(tensor, memory_format=torch.preserve_format))
            device = tensor.device if group.get("fused") else torch.device("cpu")
            state["step"] = torch.tensor(float(adam_step), dtype=torch.float32, device=device)
    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:
        link()
    for name, param in _trained(engine):
        fp32 = saved[f"{name}::fp32"].to(param.device)
        if hasattr(param, "_hp_mapping"):
            safe_set_full_fp32_param(param, fp32)
            for key in MOMENTS:
                safe_set_full_optimizer_state(param, saved[f"{name}::{key}"].to(param.device), key)
            continue
        param.data.copy_(fp32.to(param.dtype))
        for key in MOMENTS:
            base.state[param][key].copy_(saved[f"{name}::{key}"])
    scheduler.last_epoch = step
    lrs = [base_lr * factor(step) for base_lr, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs
    engine.global_steps = step


def resize_reason(old: int, new: int, preempted: bool) -> str:
    if preempted:
        return "preemption: a node announced its reclaim and the run checkpointed before it went"
    if new < old:
        return "capacity lost: a worker or its node went away"
    return "capacity returned: more workers fit on the cluster"


def resize_tag(old: int, new: int, step: int, preempted: bool) -> tuple[str, str]:
    """``(key, value)`` of the tag that records one resize of the run."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return (f"elastic.resize.step{step:08d}",
            f"{stamp} at step {step}: {old} -> {new} workers ({resize_reason(old, new, preempted)})")
