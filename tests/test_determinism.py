"""Determinism through faults, all real (Ray Train with 2 CPU workers, DeepSpeed ZeRO-1, MLflow on
SQLite): a stage-2 job whose rank 1 dies twice and whose driver is killed with SIGKILL, then launched
again, ends with the very same restorer weights (bit for bit) and losses as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from _model_fixtures import tiny_clip_file, tiny_perceiver
from _train_fixtures import TINY_NAFNET_RESTORER, build_tiny_shards
from conftest import REPO
from perceive_ir.config import from_dict, load_config
from perceive_ir.models import PerceiverConfig, RestorerConfig
from perceive_ir.orchestration.config import Stage2Config

pytestmark = pytest.mark.slow

STEPS = 8


def _checkpoint_steps(folder: Path) -> set[int]:
    return {json.loads(p.read_text())["step"] for p in folder.glob("checkpoint_*/index_rank0.json")}


@pytest.fixture(scope="module")
def inputs(package_photos, tmp_path_factory):
    """Shards, and stage-1 products made directly: a tiny random-CLIP perceiver and two fold restorers."""
    from perceive_ir.products import save_medium_tier, save_perceiver

    root = tmp_path_factory.mktemp("determinism")
    shards = build_tiny_shards(package_photos, str(root / "shards"))
    clip = tiny_clip_file(root / "clip.safetensors", seed=0)
    perceiver = tiny_perceiver(clip, n_ctx=4)
    save_perceiver(perceiver, from_dict(PerceiverConfig, {"architecture": "clip_tiny", "pretrained": None,
                                                          "clip_weights": str(clip),
                                                          "arch_config": str(REPO / "configs/models/clip_tiny.json"),
                                                          "n_ctx": 4}), root / "perceiver")
    fold_cfg = from_dict(RestorerConfig, TINY_NAFNET_RESTORER)
    torch.manual_seed(1)
    save_medium_tier([fold_cfg.build() for _ in range(2)], fold_cfg, root / "medium_tier")
    return root, [
        f"data.train.sources=[{{location: {shards}}}]", f"perceiver={root / 'perceiver'}",
        f"medium_tier={root / 'medium_tier'}", f"tracking.uri=sqlite:///{root / 'mlflow.db'}",
        "tracking.experiment=determinism", f"storage.path={root / 'ray'}", "storage.max_failures=3",
        f"loop.max_steps={STEPS}", "loop.checkpoint_every=2", "loop.log_every=1", "loop.val_every=4",
        "ray.num_workers=2", "ray.health_check_interval_s=0.1", "data.train.patch_size=32",
        "data.train.samples_per_epoch=16", "data.validation.images=2", "data.validation.types=[haze]",
        "data.validation.patch_size=32",
    ]


def _restorer_and_losses(uri: str, run_id: str, folder: Path) -> tuple[dict, bytes, dict[int, float]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    local = Path(client.download_artifacts(run_id, "restorer/model.safetensors", str(folder)))
    losses: dict[int, float] = {}
    for metric in sorted(client.get_metric_history(run_id, "train/total"), key=lambda m: m.timestamp):
        losses[metric.step] = metric.value  # a step trained again after a failure: its last value
    return load_file(str(local)), local.read_bytes(), losses


def test_two_worker_deaths_and_a_killed_driver_change_no_bit_of_the_result(inputs, tmp_path):
    import ray

    from perceive_ir.orchestration.trainer import launch

    root, common = inputs
    marker = root / "died"
    faulty = common + ["name=faulty", "loop.failure_injection.at_steps=[3, 5]", "loop.failure_injection.rank=1",
                       f"loop.failure_injection.marker={marker}"]
    env = dict(os.environ, HF_HUB_OFFLINE="1",
               PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
    driver = subprocess.Popen([sys.executable, "jobs/stage2.py", "--config", "configs/stage2_tiny.yaml", *faulty],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
    checkpoints = root / "ray" / "faulty"
    deadline = time.monotonic() + 600
    while driver.poll() is None and max(_checkpoint_steps(checkpoints) | {0}) < 6 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert driver.poll() is None, driver.communicate()[0][-4000:]
    os.kill(driver.pid, signal.SIGKILL)  # kill -9 of the driver, mid-run
    killed_at_ms = time.time() * 1000
    output = driver.communicate()[0]
    assert Path(f"{marker}.step3").exists() and Path(f"{marker}.step5").exists(), output[-4000:]

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(REPO)
        try:
            relaunched = launch("stage2", load_config(Stage2Config, REPO / "configs/stage2_tiny.yaml", faulty), REPO)
            straight = launch("stage2", load_config(Stage2Config, REPO / "configs/stage2_tiny.yaml",
                                                    common + ["name=straight"]), REPO)
        finally:
            ray.shutdown()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=straight.tracking_uri)
    # Rank 0's buffer of the launch killed with its driver may lose its last seconds of metric points;
    # the first restart's record is long written by then.
    assert (2, 2.0) in [(m.step, m.value) for m in client.get_metric_history(relaunched.run_id, "resumed_from_step")]
    after_kill = [m.step for m in client.get_metric_history(relaunched.run_id, "train/total")
                  if m.timestamp > killed_at_ms]
    assert min(after_kill) >= 5 and max(after_kill) == STEPS  # the relaunch continued from a checkpoint

    weights_a, bytes_a, losses_a = _restorer_and_losses(straight.tracking_uri, straight.run_id, tmp_path / "a")
    weights_b, bytes_b, losses_b = _restorer_and_losses(straight.tracking_uri, relaunched.run_id, tmp_path / "b")
    assert sorted(losses_a) == sorted(losses_b) == list(range(1, STEPS + 1))
    assert losses_a == losses_b  # exactly, step by step
    assert weights_a.keys() == weights_b.keys() and all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    assert bytes_a == bytes_b
