"""Device audit: every tensor a stage's forward touches follows the model to its device.

A tensor kept in a plain attribute (a cache, a constant made in ``__init__``) is not moved by
``module.to(device)``; on a GPU the first op that mixes it with a CUDA tensor fails, and only
there. This test finds that class of bug on a CPU-only machine:

1. Each case builds its stage task on the CPU exactly as a job's worker does
   (``orchestration.worker.build_task``: stage-1 products loaded, prompts frozen), then moves it
   the way the training loop does (``task.model.to(device)``), to the ``meta`` device.
2. Meta tensors carry shapes and dtypes but no data, so the forward costs almost nothing. While
   it runs, a ``TorchFunctionMode`` looks at every tensor argument of every torch call and
   records any that is not on ``meta``: stricter than waiting for an op to refuse a mix, since
   several ops accept CPU scalars next to tensors of another device.
3. ``torch.nonzero`` has no meta kernel (its output size depends on the data); torch's own
   switch makes it assume every element is non-zero, which keeps the shapes consistent.
4. Where a forward cannot run on meta at all, the static walk (parameters, buffers and the plain
   tensor attributes of every submodule) still applies: it runs on every case.

To cover a new module or stage variant, add a case to ``CASES``.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml
from torch.overrides import TorchFunctionMode

from _model_fixtures import TINY_CONDITIONING, TINY_NAFNET, TINY_RESTORMER
from perceive_ir.config import load_config
from perceive_ir.orchestration.config import Stage1Config, Stage2Config
from perceive_ir.orchestration.worker import build_task
from perceive_ir.train.steps import DegradedBatch

REPO = Path(__file__).resolve().parents[1]
META = torch.device("meta")
# meta always; a real GPU where there is one (benchmarks/gpu_check.sh runs the ``cuda`` marker).
DEVICES = [pytest.param(META, id="meta")] + [
    pytest.param(torch.device("cuda"), id="cuda", marks=pytest.mark.cuda) for _ in range(torch.cuda.is_available())]
BATCH, SIZE = 2, 32
KEYS = ["scene-a", "scene-b"]


class ForeignTensorRecorder(TorchFunctionMode):
    """Records (call, device, shape) for every tensor argument not on ``device``."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device = device
        self.foreign: list[tuple[str, str, tuple[int, ...]]] = []

    def _check(self, name: str, value) -> None:
        if isinstance(value, torch.Tensor):
            if value.device != self.device:
                self.foreign.append((name, str(value.device), tuple(value.shape)))
        elif isinstance(value, (list, tuple)):
            for item in value:
                self._check(name, item)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))
        for value in (*args, *kwargs.values()):
            self._check(name, value)
        return func(*args, **kwargs)


@contextlib.contextmanager
def meta_forward(device: torch.device):
    """Record foreign tensors while code runs on ``device`` (with nonzero's meta fallback on)."""
    import torch.fx.experimental._config as fx_config

    recorder = ForeignTensorRecorder(device)
    previous = fx_config.meta_nonzero_assume_all_nonzero
    fx_config.meta_nonzero_assume_all_nonzero = True
    try:
        with recorder:
            yield recorder
    finally:
        fx_config.meta_nonzero_assume_all_nonzero = previous


def stray_tensors(model: torch.nn.Module, device: torch.device) -> list[str]:
    """Parameters and buffers off ``device``, and tensors held in plain attributes of submodules."""
    found = [f"parameter {n} on {p.device}" for n, p in model.named_parameters() if p.device != device]
    found += [f"buffer {n} on {b.device}" for n, b in model.named_buffers() if b.device != device]
    for name, sub in model.named_modules():
        for attr, value in vars(sub).items():
            if isinstance(value, torch.Tensor):
                found.append(f"plain tensor attribute {name or '<root>'}.{attr} on {value.device}")
    return found


def degraded_batch(device: torch.device) -> DegradedBatch:
    images = torch.rand(BATCH, 3, SIZE, SIZE, device=device)
    types = torch.tensor([0, 3], device=device)
    return DegradedBatch(clean=images, degraded=images, types=["gaussian_noise", "haze"], type_index=types,
                         keys=list(KEYS), clean_ids=list(KEYS))


# -- building tasks as the job does -------------------------------------------------------------------

NAFNET = {"name": "nafnet", "params": TINY_NAFNET}
RESTORMER = {"name": "restormer", "params": TINY_RESTORMER}
PERCEIVE_IR = {"name": "perceive_ir", "params": TINY_CONDITIONING}
ETB = yaml.safe_load((REPO / "configs/models/restormer_etb_tiny.yaml").read_text())  # the paper's network
EVERY_LOSS = ["loss.l1=0.1", "loss.l2=0.05", "loss.l3=0.1"]  # the tiny profile's VGG stands in for VGG-16


@contextlib.contextmanager
def in_repository():
    """Relative model paths in the configs resolve as in a job's working folder."""
    import os

    previous = os.getcwd()
    os.chdir(REPO)
    try:
        yield
    finally:
        os.chdir(previous)


def _yaml(value: dict) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip()


@pytest.fixture(scope="module")
def stage1_products(tmp_path_factory):
    """A stage-1 task built by the worker's code, and its saved products (the stage-2 inputs)."""
    from perceive_ir.products import save_medium_tier, save_perceiver

    folder = tmp_path_factory.mktemp("device_audit")
    cfg = load_config(Stage1Config, REPO / "configs/stage1_tiny.yaml")
    with in_repository():
        task = build_task("stage1", cfg, None, folder / "cache")
    save_medium_tier(list(task.model.restorers), task.restorer_cfg, folder / "medium_tier")
    save_perceiver(task.model.perceiver, task.perceiver_cfg, folder / "perceiver")
    return folder


def build_stage1(products: Path):
    cfg = load_config(Stage1Config, REPO / "configs/stage1_tiny.yaml")
    with in_repository():
        return build_task("stage1", cfg, None, products / "cache")


def build_stage2(products: Path, backbone: dict, conditioning: dict, medium: bool = True):
    overrides = [f"perceiver={products / 'perceiver'}", f"restorer.backbone={_yaml(backbone)}",
                 f"restorer.conditioning={_yaml(conditioning)}", *EVERY_LOSS]
    if medium:
        overrides.append(f"medium_tier={products / 'medium_tier'}")
    cfg = load_config(Stage2Config, REPO / "configs/stage2_tiny.yaml", overrides)
    with in_repository():
        return build_task("stage2", cfg, None, products / "cache")


# -- what each case runs on the moved model --------------------------------------------------------------

def run_stage1(task, device: torch.device) -> None:
    batch = degraded_batch(device)
    for step in (0, task.restorer_steps):  # phase "restorers", then "prompts"
        terms = task.compute(task.model, batch, step)
        assert terms["total"].device == device
    task.model.medium(batch.degraded, batch.clean_ids)


def run_stage2(task, device: torch.device) -> None:
    batch = degraded_batch(device)
    terms = task.compute(task.model, batch, 0)
    assert terms["total"].device == device and {"rec", "clip", "dpl"} <= set(terms)
    task.perceiver.quality_score(task._last_restored)  # what live_metrics and validation score with
    task.model.restore(batch.degraded)


CASES: dict[str, tuple[Callable, Callable]] = {
    "stage1 nafnet folds + perceiver": (build_stage1, run_stage1),
    "stage2 nafnet + perceive_ir, every loss, medium tier": (
        lambda p: build_stage2(p, NAFNET, PERCEIVE_IR), run_stage2),
    "stage2 restormer + perceive_ir, every loss, medium tier": (
        lambda p: build_stage2(p, RESTORMER, PERCEIVE_IR), run_stage2),
    "stage2 restormer ETB (PGM + PGCA in the blocks), every loss, medium tier": (
        lambda p: build_stage2(p, ETB["backbone"], ETB["conditioning"]), run_stage2),
    "stage2 restormer, no conditioning, no medium tier": (
        lambda p: build_stage2(p, RESTORMER, {"name": "none"}, medium=False), run_stage2),
    "stage2 nafnet, no conditioning, medium tier": (
        lambda p: build_stage2(p, NAFNET, {"name": "none"}), run_stage2),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(CASES))
def test_every_tensor_follows_the_model_to_its_device(case, device, stage1_products):
    build, run = CASES[case]
    task = build(stage1_products)
    task.model.to(device)  # as the training loop moves it
    assert stray_tensors(task.model, device) == []
    with meta_forward(device) as recorder:
        run(task, device)
    assert recorder.foreign == [], f"{case}: tensors left behind: {recorder.foreign[:10]}"


def test_the_audit_catches_a_cache_in_a_plain_attribute(stage1_products):
    """The bug this file exists for: text features cached outside the module's buffers."""
    task = build_stage2(stage1_products, NAFNET, {"name": "none"})
    perceiver = task.perceiver
    cached = perceiver._buffers.pop("frozen_text")
    object.__setattr__(perceiver, "frozen_text", cached)  # a plain attribute, as before the fix
    task.model.to(META)
    assert any("frozen_text" in line for line in stray_tensors(task.model, META))
    with meta_forward(META) as recorder:
        run_stage2(task, META)
    assert any(device == "cpu" and shape == tuple(cached.shape) for _, device, shape in recorder.foreign)


def test_frozen_text_features_follow_moves_and_casts(stage1_products):
    task = build_stage2(stage1_products, NAFNET, {"name": "none"})
    perceiver = task.perceiver
    assert perceiver.frozen_text is not None and "frozen_text" not in perceiver.state_dict()
    expected = perceiver.prompts(perceiver.clip)
    perceiver.to(torch.float64)
    assert perceiver.text_features().dtype == torch.float64
    torch.testing.assert_close(perceiver.text_features().float(), expected, rtol=0, atol=1e-6)
