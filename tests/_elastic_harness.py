"""One launch of a tiny stage-2 run on local processes (gloo, real DeepSpeed), for the elastic tests.

``python tests/_elastic_harness.py SPEC.json`` starts ``spec["world"]`` ranks, each training from the
newest checkpoint in ``spec["checkpoints"]`` until ``spec["stop_after"]``. Every rank appends the
sample keys of each micro-batch it trains on to ``keys_rank<r>.jsonl`` in ``spec["out"]``; rank 0
writes the metrics it logged to ``metrics_launch<n>.json`` and, at the run's last step, the restorer.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "platform"), str(REPO), str(REPO / "tests")]


def launch(spec: dict, spec_file: Path) -> None:
    """All ranks of one launch, as subprocesses; raises if one fails."""
    from conftest import _free_port

    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "WORLD_SIZE": str(spec["world"]), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, __file__, str(spec_file)],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, cwd=REPO)
             for r in range(spec["world"])]
    codes = [p.wait(timeout=600) for p in procs]
    if any(codes):
        raise RuntimeError(f"elastic harness launch {spec} failed: exit codes {codes}")


class SharedFolderReporter:
    """Checkpoints of all ranks merged in ``folder/step_{n:08d}`` (the last two kept)."""

    def __init__(self, folder: Path, rank: int) -> None:
        from perceive_ir.train.loop import LocalReporter

        self.local, self.rank = LocalReporter(folder), rank

    def latest(self):
        return self.local.latest()

    def preemption_notice(self) -> bool:
        return False

    def report(self, metrics: dict, directory: str) -> None:
        import torch.distributed as dist

        target = self.local.folder / f"step_{int(metrics['step']):08d}"
        if self.rank == 0 and target.exists():
            shutil.rmtree(target)
        dist.barrier()
        shutil.copytree(directory, target, dirs_exist_ok=True)
        dist.barrier()
        if self.rank == 0:
            for old in self.local._existing()[:-2]:
                shutil.rmtree(old)


def main(spec_file: Path) -> None:
    import torch

    from _model_fixtures import TINY_VGG, tiny_perceiver
    import yaml

    from _train_fixtures import FolderTracker
    from perceive_ir.config import from_dict
    from perceive_ir.data.pipeline import LoaderConfig, ShardSourceConfig
    from perceive_ir.degrade import DegradationConfig
    from perceive_ir.eval.validation import ValidationConfig
    from perceive_ir.losses import LossConfig
    from perceive_ir.models import RestorerConfig
    from perceive_ir.train.config import EngineConfig, LoopConfig, OptimizerConfig
    from perceive_ir.train.engine import init_distributed
    from perceive_ir.train.loop import TrainingSettings, run_training
    from perceive_ir.train.tasks import Stage2Task

    spec = json.loads(spec_file.read_text())
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    out = Path(spec["out"])
    torch.set_num_threads(1)
    cpu = torch.device("cpu")
    init_distributed(cpu)
    settings = TrainingSettings(
        loader=LoaderConfig(sources=[ShardSourceConfig(spec["shards"])], patch_size=32, batch_size=2,
                            samples_per_epoch=spec["samples_per_epoch"], num_workers=spec.get("loader_workers", 0),
                            shuffle_buffer=4),
        degradation=DegradationConfig(mixture={"gaussian_noise": 1.0, "rain": 1.0, "haze": 1.0}),
        validation=ValidationConfig(images=1, patch_size=32, types=["haze"]),
        loop=LoopConfig(max_steps=spec["max_steps"], stop_after_steps=spec["stop_after"], log_every=1,
                        val_every=1000, checkpoint_every=spec.get("checkpoint_every", 2)),
        optimizer=OptimizerConfig(lr=2e-3, warmup_steps=1, min_lr=1e-5),
        engine=EngineConfig(deepspeed_config=str(REPO / "configs/deepspeed/zero1.json"), zero_stage=spec["zero"]),
        global_micro_batches=spec["slots"], portable_optimizer=True,
    )
    # L_cl's negatives: the step's global batch, gathered from the other ranks and, under
    # accumulation, from this rank's other micro-batches
    loss = from_dict(LossConfig, {"l1": 0.1, "l2": 0.05, "l3": 0.1,
                                  "perceptual": {"name": "difficulty_adaptive_perceptual", "params": {"vgg": TINY_VGG}}})

    class RecordingTask(Stage2Task):
        def compute(self, engine, batch, step):
            with (out / f"keys_rank{rank}.jsonl").open("a") as f:
                f.write(json.dumps({"step": step + 1, "keys": list(batch.keys)}) + "\n")
            return super().compute(engine, batch, step)

    torch.manual_seed(0)
    # the paper's restorer (tiny), whose degradation codes L_cl contrasts
    restorer = from_dict(RestorerConfig, yaml.safe_load((REPO / "configs/models/restormer_tiny.yaml").read_text()))
    task = RecordingTask(restorer, loss, tiny_perceiver(Path(spec["clip"])), None, settings.optimizer,
                         settings.loop.max_steps)
    tracker = FolderTracker(out) if rank == 0 else None
    run_training(task, settings, SharedFolderReporter(Path(spec["checkpoints"]), rank), tracker, rank, world, cpu)
    if tracker is not None:
        launches = len(list(out.glob("metrics_launch*.json")))
        (out / f"metrics_launch{launches}.json").write_text(json.dumps({"metrics": tracker.metrics,
                                                                         "tags": tracker.tags}))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
