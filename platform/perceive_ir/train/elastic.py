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

__all__ = ["global_micro_batches", "check_sizes", "save_portable_optimizer", "load_portable_optimizer", "resize_tag",
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


def _groups(engine) -> list[list[torch.nn.Parameter]]:
    """The model's parameters of each optimiser group: ZeRO and DeepSpeed's bf16 optimiser keep them
    per group (their torch optimiser holds flat partitions instead); else the torch groups themselves."""
    for name in ("bit16_groups", "bf16_groups"):
        groups = getattr(engine.optimizer, name, None)
        if groups is not None:
            return [list(group) for group in groups]
    return [list(group["params"]) for group in _base_optimizer(engine).param_groups]


def _group_steps(engine) -> list[Optional[float]]:
    """Adam's step count of each group, None where the group has no state yet (a phase not started):
    the same on every rank."""
    steps = []
    for group in _base_optimizer(engine).param_groups:
        found = None
        for tensor in group["params"]:
            step = _base_optimizer(engine).state.get(tensor, {}).get("step")
            if step is not None:
                found = float(step.item() if torch.is_tensor(step) else step)
                break
        steps.append(found)
    return steps


def _names(engine) -> dict[int, str]:
    return {id(p): name for name, p in engine.module.named_parameters()}


def _relink(engine) -> None:
    """DeepSpeed links each parameter to its fragment of the optimiser state once, at the first step;
    a group whose state appeared later (a training phase that starts later) is not linked. Link again."""
    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:
        engine.optimizer._hp_optimizer_states_linked = False
        link()


def _full(engine, param: torch.nn.Parameter, key: str) -> torch.Tensor:
    """The full fp32 master (``fp32``) or Adam moment of a parameter of a group with state (collective
    under ZeRO: every rank calls it for the same parameters)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    if hasattr(param, "_hp_mapping"):
        return safe_get_full_fp32_param(param) if key == "fp32" else safe_get_full_optimizer_state(param, key)
    if key == "fp32":
        return param.detach().float()
    value = _base_optimizer(engine).state.get(param, {}).get(key)  # absent: the parameter never had a gradient
    return value if value is not None else torch.zeros_like(param, dtype=torch.float32)


def save_portable_optimizer(engine, directory: str | Path, rank: int) -> None:
    """Every rank takes part; rank 0 writes the files."""
    from safetensors.torch import save_file

    _relink(engine)
    names, steps = _names(engine), _group_steps(engine)
    tensors: dict[str, torch.Tensor] = {}
    for params, step in zip(_groups(engine), steps):
        for param in (p for p in params if p.requires_grad):
            for key in ("fp32", *MOMENTS) if step is not None else ("fp32",):
                value = _full(engine, param, key)
                if rank == 0:
                    tensors[f"{names[id(param)]}::{key}"] = value.detach().to("cpu", torch.float32).contiguous()
    if rank == 0:
        save_file(tensors, str(Path(directory) / PORTABLE_WEIGHTS))
        (Path(directory) / PORTABLE_META).write_text(json.dumps({"group_steps": steps}))


def has_portable_optimizer(directory: str | Path) -> bool:
    return (Path(directory) / PORTABLE_WEIGHTS).is_file() and (Path(directory) / PORTABLE_META).is_file()


def load_portable_optimizer(engine, scheduler, directory: str | Path, step: int) -> None:
    """Into an engine whose module weights were loaded from the checkpoint: fp32 masters, moments,
    Adam's step counts and the schedule's position (``step`` optimiser steps done)."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state
    from safetensors.torch import load_file

    saved = load_file(str(Path(directory) / PORTABLE_WEIGHTS))
    steps = json.loads((Path(directory) / PORTABLE_META).read_text())["group_steps"]
    base, names, groups = _base_optimizer(engine), _names(engine), _groups(engine)
    if len(steps) != len(groups):
        raise ValueError(f"checkpoint '{directory}': {len(steps)} optimizer groups saved, the model has {len(groups)}")
    missing = [names[id(p)] for params in groups for p in params
               if p.requires_grad and f"{names[id(p)]}::fp32" not in saved]
    if missing:
        raise ValueError(f"checkpoint '{directory}': no portable optimizer state for {missing[:5]} "
                         f"({len(missing)} parameters): was it written by another model?")
    # Adam's state appears at a group's first step; a fresh engine has none. Create it (zeros and the
    # step count) for the groups that had it, then let DeepSpeed link each parameter's fragments to it.
    for group, group_step in zip(base.param_groups, steps):
        if group_step is None:
            continue
        for tensor in group["params"]:
            state = base.state.setdefault(tensor, {})
            for key in MOMENTS:
                state.setdefault(key, torch.zeros_like(tensor, memory_format=torch.preserve_format))
            device = tensor.device if group.get("fused") else torch.device("cpu")
            state["step"] = torch.tensor(group_step, dtype=torch.float32, device=device)
    _relink(engine)
    for params, group_step in zip(groups, steps):
        for param in (p for p in params if p.requires_grad):
            name = names[id(param)]
            fp32 = saved[f"{name}::fp32"].to(param.device)
            if hasattr(param, "_hp_mapping"):
                safe_set_full_fp32_param(param, fp32)
                for key in MOMENTS if group_step is not None else ():
                    safe_set_full_optimizer_state(param, saved[f"{name}::{key}"].to(param.device), key)
                continue
            param.data.copy_(fp32.to(param.dtype))
            for key in MOMENTS if group_step is not None else ():
                state = base.state.setdefault(param, {})
                state[key] = saved[f"{name}::{key}"].to(param.device, param.dtype).clone()
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
