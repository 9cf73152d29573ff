"""Training without Ray: the schedule, and the stage-1/stage-2 tasks under a real DeepSpeed
engine (one process, gloo) with exact resume from a checkpoint."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from _train_fixtures import TINY_NAFNET_RESTORER, FolderTracker, build_tiny_shards
from perceive_ir.config import ConfigError, from_dict
from perceive_ir.data.pipeline import LoaderConfig, LoaderPhase, ShardSourceConfig
from perceive_ir.degrade import DegradationConfig
from perceive_ir.eval.validation import HeldOutSet, ValidationConfig, mean_psnr
from perceive_ir.losses import LossConfig
from perceive_ir.models import PerceiverConfig, RestorerConfig
from perceive_ir.train.config import EngineConfig, LoopConfig, OptimizerConfig
from perceive_ir.train.engine import deepspeed_settings, init_distributed, make_optimizer
from perceive_ir.train.loop import LocalReporter, TrainingSettings, run_training
from perceive_ir.products import ensure_clip_weights, load_perceiver, medium_tier_generator
from perceive_ir.train.schedule import phase_factor, warmup_cosine
from perceive_ir.train.tasks import Stage1Task, Stage2Task

REPO = Path(__file__).resolve().parents[1]
TINY_VGG = {"pretrained": False, "widths": [8, 16, 16, 32, 32], "layers": [3, 8, 15, 22]}


def test_warmup_then_cosine_to_the_floor():
    factors = [warmup_cosine(s, warmup=4, total=20, floor=0.1) for s in range(21)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(factors[4:], factors[5:]))
    assert math.isclose(factors[20], 0.1)
    phase = phase_factor(start=10, length=5, warmup=0, floor=0.0)
    assert phase(9) == 0.0 and phase(15) == 0.0 and phase(10) == 1.0


def test_deepspeed_settings_fill_batch_precision_and_name_a_missing_file(tmp_path):
    cfg = EngineConfig(deepspeed_config=str(REPO / "configs/deepspeed/zero2.json"), gradient_accumulation_steps=3,
                       gradient_clipping=0.5)
    settings = deepspeed_settings(cfg, micro_batch=4, world_size=2, device=torch.device("cpu"))
    assert settings["train_batch_size"] == 24 and settings["gradient_clipping"] == 0.5
    assert settings["bf16"] == {"enabled": False} and settings["zero_optimization"]["stage"] == 2
    alone = deepspeed_settings(cfg, micro_batch=4, world_size=1, device=torch.device("cpu"))
    assert alone["zero_optimization"]["stage"] == 0  # one fp32 rank: nothing to partition
    bf16 = EngineConfig(deepspeed_config=cfg.deepspeed_config, precision="bf16")
    assert deepspeed_settings(bf16, 4, 1, torch.device("cpu"))["zero_optimization"]["stage"] == 2
    with pytest.raises(ConfigError, match="engine.deepspeed_config.*does not exist"):
        deepspeed_settings(EngineConfig(deepspeed_config=str(tmp_path / "nope.json")), 4, 1, torch.device("cpu"))


def test_optimizer_is_fused_adamw_and_matches_the_default_one():
    torch.manual_seed(0)
    weights = [torch.randn(5, 3, requires_grad=True), torch.randn(7, requires_grad=True)]
    copies = [w.detach().clone().requires_grad_() for w in weights]
    fused = make_optimizer([{"params": weights}], OptimizerConfig(lr=1e-2))
    plain = torch.optim.AdamW([{"params": copies}], lr=1e-2, weight_decay=OptimizerConfig().weight_decay)
    assert fused.defaults["fused"] is True
    for _ in range(3):
        for params, optimizer in ((weights, fused), (copies, plain)):
            optimizer.zero_grad()
            sum((p ** 2).sum() for p in params).backward()
            optimizer.step()
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(weights, copies))


@pytest.fixture(scope="module")
def shards(package_photos, tmp_path_factory) -> str:
    return build_tiny_shards(package_photos, str(tmp_path_factory.mktemp("train") / "shards"))


def settings(shards: str, **loop) -> TrainingSettings:
    return TrainingSettings(
        loader=LoaderConfig(sources=[ShardSourceConfig(shards)], patch_size=32, batch_size=4, samples_per_epoch=12,
                            num_workers=0, shuffle_buffer=8),
        degradation=DegradationConfig(mixture={"gaussian_noise": 1.0, "rain": 1.0, "haze": 1.0}),
        validation=ValidationConfig(images=2, patch_size=32, types=["gaussian_noise", "haze"]),
        loop=LoopConfig(**{"max_steps": 4, "log_every": 1, "val_every": 2, "checkpoint_every": 2, **loop}),
        optimizer=OptimizerConfig(lr=1e-3, warmup_steps=1, min_lr=1e-5),
        engine=EngineConfig(deepspeed_config=str(REPO / "configs/deepspeed/zero1.json")),
    )


def _tiny_stage1_models(tmp_path: Path, monkeypatch) -> tuple[RestorerConfig, PerceiverConfig]:
    """The tiny restorer and perceiver profiles, with a one-process gloo group for DeepSpeed."""
    monkeypatch.chdir(REPO)  # relative model paths in the configs
    monkeypatch.setenv("MASTER_PORT", str(_port()))
    init_distributed(torch.device("cpu"))
    restorer_cfg = from_dict(RestorerConfig, TINY_NAFNET_RESTORER)
    perceiver_cfg = ensure_clip_weights(
        from_dict(PerceiverConfig, yaml.safe_load((REPO / "configs/models/perceiver_tiny.yaml").read_text())),
        seed=0, cache=tmp_path / "clip")
    return restorer_cfg, perceiver_cfg


def test_stage1_products_feed_stage2_which_resumes_exactly(shards, tmp_path, monkeypatch):
    cpu = torch.device("cpu")
    restorer_cfg, perceiver_cfg = _tiny_stage1_models(tmp_path, monkeypatch)

    s1 = settings(shards)
    stage1 = Stage1Task(restorer_cfg, [restorer_cfg.build() for _ in range(2)], True, perceiver_cfg,
                        s1.optimizer, prompt_lr=1e-3, restorer_steps=2, prompt_steps=2)
    tracker1 = FolderTracker(tmp_path / "stage1")
    state = run_training(stage1, s1, LocalReporter(tmp_path / "ck1"), tracker1, 0, 1, cpu)
    assert state.step == 4 and state.samples == 16 and state.global_batch == 4
    assert [s for s, _ in tracker1.metrics["lr/restorers"]] == [1, 2, 3, 4]
    assert tracker1.metrics["lr/restorers"][-1][1] == 0.0 and tracker1.metrics["lr/prompts"][0][1] == 0.0
    assert "val/gaussian_noise/psnr_out" in tracker1.metrics and "val/tier_accuracy" in tracker1.metrics
    assert len(list((tmp_path / "stage1/validation_grids").glob("*.png"))) == 2
    assert sorted(p.name for p in (tmp_path / "ck1").iterdir()) == ["step_00000002", "step_00000004"]

    perceiver_dir, medium_dir = tmp_path / "stage1/perceiver", tmp_path / "stage1/medium_tier"
    # the probe as one number on the validation pairs, which the test computes itself below
    loss_cfg = from_dict(LossConfig, {"l1": 0.0, "perceptual": {"name": "difficulty_adaptive_perceptual", "params": {
        "vgg": TINY_VGG, "probe": "pooled", "probe_source": "validation"}}})

    initial_probe_psnr = []

    def stage2(run: str, **loop) -> tuple[FolderTracker, dict]:
        s2 = settings(shards, **loop)
        task = Stage2Task(restorer_cfg, loss_cfg, load_perceiver(perceiver_dir), medium_tier_generator(medium_dir),
                          s2.optimizer, s2.loop.max_steps)
        initial_probe_psnr.append(mean_psnr(task.model.restore, HeldOutSet(s2.validation, shards)))
        tracker = FolderTracker(tmp_path / run)
        run_training(task, s2, LocalReporter(tmp_path / f"ck-{run}"), tracker, 0, 1, cpu)
        return tracker, task

    straight, _ = stage2("straight")
    from perceive_ir.weights import sha256_file

    identities = json.loads((tmp_path / "straight/weights/weight_identities.json").read_text())
    assert list(identities.values()) == [sha256_file(perceiver_dir / "clip.safetensors")]  # the perceiver's CLIP
    # L_dpl's reference rule: the probe PSNR is measured before step 1 and at each epoch start
    # (3 batches per epoch: before step 4), and the loss's buffer holds it between.
    probe = straight.metrics["train/probe_psnr"]
    assert [s for s, _ in probe] == [1, 2, 3, 4]
    assert probe[0][1] == probe[1][1] == probe[2][1] == pytest.approx(initial_probe_psnr[0], abs=1e-4)
    assert math.isfinite(probe[3][1]) and probe[3][1] != probe[0][1]
    first, _ = stage2("resumed", stop_after_steps=2)
    assert not (tmp_path / "resumed/restorer").exists()  # stopped early: no final product yet
    again, _ = stage2("resumed")
    assert again.metrics["resumed_from_step"] == [(2, 2.0)]
    assert [s for s, _ in again.metrics["train/total"]] == [3, 4]
    # resumed mid-epoch: step 3 uses the probe PSNR saved with the checkpoint, then epoch 1 measures
    assert again.metrics["train/probe_psnr"] == probe[2:]
    for (sa, a), (sb, b) in zip(straight.metrics["train/total"][2:], again.metrics["train/total"]):
        assert sa == sb and math.isclose(a, b, rel_tol=1e-5), (sa, a, b)
    assert {"train/rec", "train/clip", "train/dpl", "train/quality_out"} <= set(straight.metrics)
    a = load_file(str(tmp_path / "straight/restorer/model.safetensors"))
    b = load_file(str(tmp_path / "resumed/restorer/model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class _RecordingStage1(Stage1Task):
    """Stage 1 that notes the phase and shape of every micro-batch it trains on."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[tuple[int, str, tuple[int, ...]]] = []

    def compute(self, engine, batch, step):
        self.seen.append((step, self.phase(step), tuple(batch.degraded.shape)))
        return super().compute(engine, batch, step)


def test_stage1_phases_crop_and_batch_their_own_way_and_resume_across_the_boundary(shards, tmp_path, monkeypatch):
    cpu = torch.device("cpu")
    restorer_cfg, perceiver_cfg = _tiny_stage1_models(tmp_path, monkeypatch)

    def run(name: str, **loop):
        s1 = settings(shards, checkpoint_every=1, val_every=4, **loop)
        s1.phases = [LoaderPhase(0, dataclasses.replace(s1.loader, patch_size=24, batch_size=2), "restorers"),
                     LoaderPhase(2, dataclasses.replace(s1.loader, patch_size=32, batch_size=3), "prompts")]
        torch.manual_seed(0)  # the same restorers and prompts at the start of every run
        task = _RecordingStage1(restorer_cfg, [restorer_cfg.build() for _ in range(2)], True, perceiver_cfg,
                                s1.optimizer, prompt_lr=1e-3, restorer_steps=2, prompt_steps=2)
        tracker = FolderTracker(tmp_path / name)
        state = run_training(task, s1, LocalReporter(tmp_path / f"ck-{name}", keep=10), tracker, 0, 1, cpu)
        return task, tracker, state

    task, straight, state = run("straight")
    assert task.seen == [(0, "restorers", (2, 3, 24, 24)), (1, "restorers", (2, 3, 24, 24)),
                         (2, "prompts", (3, 3, 32, 32)), (3, "prompts", (3, 3, 32, 32))]
    assert state.samples == 2 * 2 + 2 * 3 and state.global_batch == 3
    assert straight.metrics["train/global_batch"] == [(0, 2.0), (2, 3.0)]
    run("split", stop_after_steps=2)
    task, again, state = run("split")  # resumes at the boundary, in the prompt phase
    assert again.metrics["resumed_from_step"] == [(2, 2.0)] and again.metrics["train/global_batch"] == [(2, 3.0)]
    assert task.seen == [(2, "prompts", (3, 3, 32, 32)), (3, "prompts", (3, 3, 32, 32))]
    assert state.samples == 10
    for (sa, a), (sb, b) in zip(straight.metrics["train/total"][2:], again.metrics["train/total"]):
        assert sa == sb and math.isclose(a, b, rel_tol=1e-5), (sa, a, b)


def _port() -> int:
    from conftest import _free_port

    return _free_port()


def test_bad_inputs_name_what_and_where(tmp_path, s3_endpoint):
    from perceive_ir.orchestration.config import RunStorageConfig, Stage2Config
    from perceive_ir.orchestration.storage import StorageUnreachable, run_storage
    from perceive_ir.products import resolve_product
    from perceive_ir.train.state import load_state
    from perceive_ir.config import load_config

    with pytest.raises(StorageUnreachable, match="s3://no-such-bucket/runs.*does not exist"):
        run_storage(RunStorageConfig(path="s3://no-such-bucket/runs", endpoint_url=s3_endpoint["endpoint_url"]))
    with pytest.raises(FileNotFoundError, match="perceiver: folder '.*missing' \\(from 'perceiver'\\)"):
        resolve_product(str(tmp_path / "missing"), "perceiver", "perceiver")
    with pytest.raises(FileNotFoundError, match="has no trainer_state.json"):
        load_state(tmp_path, rank=0, world_size=1)
    with pytest.raises(ConfigError, match="unknown key 'loop.max_stepz'"):
        load_config(Stage2Config, REPO / "configs/stage2_tiny.yaml", ["perceiver=x", "loop.max_stepz=3"])
    with pytest.raises(ConfigError, match="stage 2 needs 'perceiver'"):
        load_config(Stage2Config, REPO / "configs/stage2_tiny.yaml")
    with pytest.raises(ConfigError, match="requires 'medium_tier' \\(require_medium_tier: true\\)"):
        load_config(Stage2Config, REPO / "configs/stage2.yaml", ["perceiver=runs:/x/perceiver"])


def test_stage2_without_medium_tier_warns_naming_the_setting():
    import warnings

    from perceive_ir.config import load_config
    from perceive_ir.orchestration.config import Stage2Config

    with pytest.warns(UserWarning, match="without 'medium_tier': L_dpl loses its hard negatives"):
        load_config(Stage2Config, REPO / "configs/stage2_tiny.yaml", ["perceiver=x", "loss.l3=0.1"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_config(Stage2Config, REPO / "configs/stage2_tiny.yaml", ["perceiver=x", "medium_tier=y", "loss.l3=0.1"])
        load_config(Stage2Config, REPO / "configs/stage2_tiny.yaml", ["perceiver=x", "loss.l3=0"])  # no L_dpl


def test_full_profiles_validate_and_zero3_is_refused():
    from perceive_ir.config import load_config
    from perceive_ir.orchestration.config import Stage1Config, Stage2Config

    stage1 = load_config(Stage1Config, REPO / "configs/stage1.yaml")
    assert stage1.loop.max_steps == stage1.restorer_steps + stage1.prompt_steps
    assert load_config(Stage1Config, REPO / "configs/stage1.yaml", ["medium_tier=runs:/x/medium_tier"]).loop.max_steps \
        == stage1.prompt_steps
    stage2 = load_config(Stage2Config, REPO / "configs/stage2.yaml",
                         ["perceiver=runs:/x/perceiver", "medium_tier=runs:/x/medium_tier"])
    assert stage2.ray.use_gpu and stage2.engine.precision == "auto"
    assert stage2.require_medium_tier and stage2.loss.perceptual.params["difficulty_rule"] == "reference"
    with pytest.raises(ConfigError, match="ZeRO stage 3"):
        deepspeed_settings(EngineConfig(deepspeed_config=str(REPO / "configs/deepspeed/zero1.json"), zero_stage=3),
                           2, 1, torch.device("cpu"))
