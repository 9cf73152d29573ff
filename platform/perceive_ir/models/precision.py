"""Frozen networks that keep their own precision (fp32) while the model around them trains in bf16.

VGG-16 (L_dpl), the CLIP towers (the perceiver, L_clip) and DINOv2 (semantic guidance) are frozen
feature extractors whose outputs feed ratios and softmaxes of small differences: in bf16 that
rounding dominates (L_dpl moved by a factor of about 4). :func:`keep_fp32` marks such a network:

- its parameters and buffers are fp32, and a dtype cast of any module around it
  (``.to(dtype)``, ``.half()``, ``.bfloat16()``, ``.double()``) moves it to the cast's device but
  leaves its dtype alone; device moves (``.to(device)``, ``meta`` included) reach it as before;
- :func:`fp32_kept`, around DeepSpeed's engine init (which casts every parameter of the module it
  is given to bf16 by assigning ``param.data``, not through ``to``), gives the marked networks
  their fp32 tensors back afterwards;
- its forward runs under :func:`full_precision`: inputs in fp32, autocast off.

Only networks without a trained parameter may be marked: the optimiser's parameters stay in the
precision the engine chose.
"""

from __future__ import annotations

import contextlib
import types
from typing import Iterator

import torch
from torch import nn

__all__ = ["keep_fp32", "keeps_fp32", "fp32_modules", "rebuilt_parameter_names", "fp32_kept", "full_precision",
           "at_least_fp32", "trained_dtype"]

_MARK = "_keeps_fp32"


def _apply_keeping_dtype(self: nn.Module, fn, recurse: bool = True) -> nn.Module:
    def keep(tensor: torch.Tensor) -> torch.Tensor:
        out = fn(tensor)
        if tensor.is_floating_point() and out.dtype != tensor.dtype:
            return tensor.to(out.device)  # the cast's device move only
        return out

    return type(self)._apply(self, keep, recurse)


def keep_fp32(module: nn.Module, from_weights: bool = False) -> nn.Module:
    """Mark a frozen ``module`` to stay fp32 (see the module docstring); returns it. ``from_weights``:
    its weights come from a pretrained file (local or the hub), so that every launch rebuilds it
    alike and checkpoints need not hold it (:func:`rebuilt_parameter_names`)."""
    if any(p.requires_grad for p in module.parameters()):
        raise ValueError(f"{type(module).__name__} has trainable parameters: only frozen networks keep fp32")
    module.float()
    object.__setattr__(module, _MARK, "weights" if from_weights else "kept")
    object.__setattr__(module, "_apply", types.MethodType(_apply_keeping_dtype, module))
    return module


def keeps_fp32(module: nn.Module) -> bool:
    return bool(module.__dict__.get(_MARK, False))


def rebuilt_parameter_names(model: nn.Module) -> set[str]:
    """Every name (shared networks under each of their names) of the parameters of ``model``'s
    fp32 networks that are built from pretrained weight files: a launch rebuilds them exactly."""
    names: set[str] = set()
    for prefix, module in model.named_modules(remove_duplicate=False):
        if module.__dict__.get(_MARK) == "weights":
            names.update(f"{prefix}.{n}" if prefix else n for n, _ in module.named_parameters(remove_duplicate=False))
    return names


def fp32_modules(model: nn.Module) -> list[nn.Module]:
    """The marked networks of ``model`` (the outermost ones; each once, however often it is shared)."""
    found: dict[int, nn.Module] = {}
    inside: set[int] = set()
    for module in model.modules():  # parents before their children
        if id(module) in inside:
            continue
        if keeps_fp32(module):
            found[id(module)] = module
            inside.update(id(m) for m in module.modules())
    return list(found.values())


def _tensors(modules: list[nn.Module]) -> list[torch.Tensor]:
    seen: dict[int, torch.Tensor] = {}
    for module in modules:
        for tensor in (*module.parameters(), *(b for b in module.buffers() if b is not None)):
            seen.setdefault(id(tensor), tensor)
    return list(seen.values())


@contextlib.contextmanager
def fp32_kept(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Whatever the block does to the marked networks' parameters and buffers (cast, move; it may
    not replace them), they hold their own fp32 data afterwards, on the device they were moved to.
    Yields those tensors."""
    tensors = _tensors(fp32_modules(model))
    saved = [(t, t.data) for t in tensors if t.is_floating_point()]
    yield tensors
    for tensor, data in saved:
        if tensor.data_ptr() != data.data_ptr():  # cast (perhaps back again) or moved: the original values
            tensor.data = data.to(tensor.device)


def full_precision(device: torch.device | str) -> contextlib.AbstractContextManager:
    """Autocast off on ``device``'s type (the caller casts its inputs to fp32)."""
    kind = torch.device(device).type
    available = getattr(torch.amp, "is_autocast_available", lambda d: d in ("cpu", "cuda"))(kind)
    return torch.autocast(kind, enabled=False) if available else contextlib.nullcontext()


def at_least_fp32(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in fp32, or in its own dtype where that is wider (float64 stays)."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def trained_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of ``module``'s own (not fp32-kept) parameters: what its inputs should be cast to."""
    kept = {id(p) for m in fp32_modules(module) for p in m.parameters()}
    for param in module.parameters():
        if id(param) not in kept:
            return param.dtype
    return next(module.parameters()).dtype
