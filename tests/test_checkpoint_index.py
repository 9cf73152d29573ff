"""Verified checkpoints: a stage-1 job on Ray (2 workers, DeepSpeed ZeRO-1) whose three newest
checkpoints are truncated, lose a rank's file and have a byte flipped is relaunched: it resumes from
the newest intact one, says so, and fails clearly only when no kept checkpoint is intact."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from _train_fixtures import build_tiny_shards
from conftest import REPO
from perceive_ir.config import load_config
from perceive_ir.orchestration.config import Stage1Config
from perceive_ir.train.checkpoint_index import (
    Candidate,
    NoValidCheckpoint,
    index_problems,
    select_checkpoint,
    write_index,
)
from perceive_ir.train.loop import LocalReporter

pytestmark = pytest.mark.slow


def truncate(checkpoint: Path) -> str:
    target = next(checkpoint.glob("checkpoint/mp_rank_00_model_states.pt"))
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    return "mp_rank_00_model_states.pt (rank 0) has"


def delete_rank_file(checkpoint: Path) -> str:
    next(checkpoint.glob("checkpoint/zero_pp_rank_1_*optim_states.pt")).unlink()
    return "(rank 1) is missing"


def flip_byte(checkpoint: Path) -> str:
    target = checkpoint / "rng_rank0.safetensors"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    return "rng_rank0.safetensors (rank 0) does not match its sha256"


@pytest.fixture(scope="module")
def job(package_photos, tmp_path_factory):
    """A first launch stopped at step 4 (checkpoints at 1, 2, 3 and 4), its storage saved aside."""
    import ray

    from perceive_ir.orchestration.trainer import launch

    root = tmp_path_factory.mktemp("ckpt")
    shards = build_tiny_shards(package_photos, str(root / "shards"))
    overrides = [
        "name=ckpt", f"data.train.sources=[{{location: {shards}}}]", f"tracking.uri=sqlite:///{root / 'mlflow.db'}",
        "tracking.experiment=ckpt", f"storage.path={root / 'ray'}", "storage.keep_last=5", "restorer_steps=3",
        "prompt_steps=3", "loop.log_every=1", "loop.checkpoint_every=1", "loop.val_every=100", "ray.num_workers=2",
        "ray.health_check_interval_s=0.1", "data.train.patch_size=32", "data.train.samples_per_epoch=16",
        "data.validation.images=2", "data.validation.types=[haze]", "data.validation.patch_size=32",
    ]
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(REPO)

        def run(stop_after: int):
            cfg = load_config(Stage1Config, REPO / "configs/stage1_tiny.yaml",
                              overrides + [f"loop.stop_after_steps={stop_after}"])
            return launch("stage1", cfg, working_dir=REPO)

        first = run(4)
        pristine = root / "pristine"
        shutil.copytree(root / "ray" / "ckpt", pristine)
        yield {"run": run, "root": root, "pristine": pristine, "run_id": first.run_id,
               "uri": f"sqlite:///{root / 'mlflow.db'}"}
    ray.shutdown()


def _checkpoints(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("checkpoint_*") if p.is_dir())


def _step(checkpoint: Path) -> int:
    return json.loads((checkpoint / "index_rank0.json").read_text())["step"]


def test_broken_newest_checkpoints_resume_from_the_newest_intact_one(job):
    from mlflow.tracking import MlflowClient

    folder = job["root"] / "ray" / "ckpt"
    checkpoints = _checkpoints(folder)
    assert [_step(c) for c in checkpoints] == [1, 2, 3, 4] and all(not index_problems(c) for c in checkpoints)
    for corrupt, checkpoint in zip((truncate, delete_rank_file, flip_byte), reversed(checkpoints)):
        expected = corrupt(checkpoint)
        problems = index_problems(checkpoint)
        assert len(problems) == 1 and expected in problems[0], problems

    job["run"](2)
    client = MlflowClient(tracking_uri=job["uri"])
    resumed = client.get_metric_history(job["run_id"], "resumed_from_step")
    skipped = client.get_metric_history(job["run_id"], "checkpoint/broken_skipped")
    assert [(m.step, m.value) for m in resumed] == [(1, 1.0)]  # not from step 4, 3 or 2
    assert [(m.step, m.value) for m in skipped] == [(1, 3.0)]
    assert 2 in {_step(c) for c in _checkpoints(folder) if not index_problems(c)}  # trained on from step 1


def test_no_intact_checkpoint_fails_naming_each_one(job, tmp_path):
    copies = []
    for corrupt, checkpoint in zip((truncate, flip_byte), _checkpoints(job["pristine"])[-2:]):
        copy = tmp_path / checkpoint.name
        shutil.copytree(checkpoint, copy)
        corrupt(copy)
        copies.append(copy)
    from contextlib import nullcontext

    candidates = [Candidate(c.name, lambda c=c: nullcontext(str(c))) for c in reversed(copies)]
    with pytest.raises(NoValidCheckpoint, match="every kept checkpoint is broken: checkpoint_.*does not match.*"
                                                "\\| checkpoint_.*bytes, .* expected.*storage.keep_last"):
        with select_checkpoint(candidates):
            pass
    with select_checkpoint([]) as nothing:  # a first launch: nothing to resume, no complaint
        assert nothing.directory is None and nothing.rejected == []


def test_an_index_lists_sizes_and_digests_and_is_written_last(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub/a.bin").write_bytes(b"abc")
    (tmp_path / "b.json").write_text("{}")
    index = json.loads(write_index(tmp_path, rank=0, world_size=2, step=7).read_text())
    assert index["step"] == 7 and set(index["files"]) == {"sub/a.bin", "b.json"}
    assert index["files"]["sub/a.bin"] == {
        "size": 3, "sha256": "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"}
    assert index_problems(tmp_path) == ["no index_rank1.json: rank 1's part is missing"]


class NoticeAfter(LocalReporter):
    """Local checkpoints, and a preemption notice that stays up from the ``calls``-th check on."""

    def __init__(self, folder: Path, calls: int) -> None:
        super().__init__(folder, keep=10)
        self.calls, self.checks = calls, 0

    def preemption_notice(self) -> bool:
        self.checks += 1
        return self.checks >= self.calls


def test_a_preemption_notice_checkpoints_at_the_next_step_once(package_photos, tmp_path, monkeypatch):
    import yaml

    from _train_fixtures import TINY_NAFNET_RESTORER, FolderTracker
    from perceive_ir.config import from_dict
    from perceive_ir.data.pipeline import LoaderConfig, ShardSourceConfig
    from perceive_ir.degrade import DegradationConfig
    from perceive_ir.eval.validation import ValidationConfig
    from perceive_ir.models import PerceiverConfig, RestorerConfig
    from perceive_ir.train.config import EngineConfig, LoopConfig, OptimizerConfig
    from perceive_ir.train.engine import init_distributed
    from perceive_ir.train.loop import TrainingSettings, run_training
    from perceive_ir.products import ensure_clip_weights
    from perceive_ir.train.tasks import Stage1Task
    from conftest import _free_port

    monkeypatch.chdir(REPO)
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    init_distributed(torch.device("cpu"))
    shards = build_tiny_shards(package_photos, str(tmp_path / "shards"))
    settings = TrainingSettings(
        LoaderConfig(sources=[ShardSourceConfig(shards)], patch_size=32, batch_size=2, samples_per_epoch=8,
                     num_workers=0, shuffle_buffer=8),
        DegradationConfig(mixture={"haze": 1.0}), ValidationConfig(images=1, patch_size=32, types=["haze"]),
        LoopConfig(max_steps=5, log_every=1, val_every=100, checkpoint_every=100),
        OptimizerConfig(lr=1e-3), EngineConfig(deepspeed_config=str(REPO / "configs/deepspeed/zero1.json")))
    restorer = from_dict(RestorerConfig, TINY_NAFNET_RESTORER)
    perceiver = ensure_clip_weights(
        from_dict(PerceiverConfig, yaml.safe_load((REPO / "configs/models/perceiver_tiny.yaml").read_text())),
        seed=0, cache=tmp_path / "clip")
    task = Stage1Task(restorer, [restorer.build() for _ in range(2)], True, perceiver, settings.optimizer,
                      prompt_lr=1e-3, restorer_steps=3, prompt_steps=2)
    reporter = NoticeAfter(tmp_path / "ck", calls=3)
    run_training(task, settings, reporter, FolderTracker(tmp_path / "logged"), 0, 1, torch.device("cpu"))
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["step_00000003", "step_00000005"]
    assert reporter.checks == 4  # checked at every step (the last one checkpoints anyway), answered once
