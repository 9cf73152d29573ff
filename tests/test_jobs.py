"""The training jobs end to end, all real: Ray Train (2 CPU workers), DeepSpeed, MLflow on SQLite,
moto's S3 server on loopback for the shards and the checkpoints, and ``ray job submit``.

One stage-1 run (with a worker killed mid-run) feeds the stage-2 tests through MLflow URIs.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from _train_fixtures import build_tiny_shards
from conftest import REPO, _free_port
from perceive_ir.config import load_config
from perceive_ir.data.storage import filesystem
from perceive_ir.orchestration.config import Stage1Config, Stage2Config
from perceive_ir.train.schedule import phase_factor

pytestmark = pytest.mark.slow

FAST_RAY = ["ray.health_check_interval_s=0.1", "ray.num_workers=2"]


def metric_history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def runs_named(client, experiment: str, name: str):
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], filter_string=f"tags.`perceive_ir.run_name` = '{name}'")


@pytest.fixture(scope="module")
def env(package_photos, s3_module_bucket, tmp_path_factory):
    bucket, options = s3_module_bucket
    root = tmp_path_factory.mktemp("jobs")
    shards = build_tiny_shards(package_photos, f"{bucket}/shards", options)
    common = [
        f"data.train.sources=[{{location: {shards}}}]",
        f"data.train.storage_options={{endpoint_url: {options['endpoint_url']}}}",
        f"tracking.uri=sqlite:///{root / 'mlflow.db'}",
        "tracking.experiment=jobs-test",
        "data.validation.types=[gaussian_noise, haze]",
        "data.validation.images=2",
        "data.train.samples_per_epoch=24",
        "data.train.patch_size=32",
        "data.validation.patch_size=32",
        "optimizer.warmup_steps=5",
    ] + FAST_RAY
    return {"root": root, "bucket": bucket, "options": options, "common": common,
            "uri": f"sqlite:///{root / 'mlflow.db'}"}


@pytest.fixture(scope="module")
def ray_session():
    import ray

    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def stage1(env, ray_session, monkeypatch_module):
    """Stage 1 with checkpoints on s3://; rank 1 dies at step 6 and the run resumes from step 4."""
    from perceive_ir.orchestration.trainer import launch

    monkeypatch_module.chdir(REPO)
    marker = env["root"] / "stage1-failed-once"
    cfg = load_config(Stage1Config, REPO / "configs/stage1_tiny.yaml", env["common"] + [
        "name=stage1-test", "restorer_steps=4", "prompt_steps=4", "loop.val_every=4", "loop.checkpoint_every=4",
        "loop.log_every=2", f"storage.path={env['bucket']}/ray", f"storage.endpoint_url={env['options']['endpoint_url']}",
        "loop.failure_injection.at_step=6", "loop.failure_injection.rank=1", f"loop.failure_injection.marker={marker}",
        "tracking.register_as=jobs-test",
    ])
    result = launch("stage1", cfg, working_dir=REPO)
    assert marker.exists()  # the worker really died
    return result


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_stage1_survives_a_killed_worker_and_hands_products_through_mlflow(env, stage1):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=stage1.tracking_uri)
    runs = runs_named(client, "jobs-test", "stage1-test")
    assert len(runs) == 1 and runs[0].info.run_id == stage1.run_id
    assert metric_history(client, stage1.run_id, "resumed_from_step") == [(4, 4.0)]  # not from step 0
    steps = [s for s, _ in metric_history(client, stage1.run_id, "train/total")]
    assert steps[-1] == 8 and 2 in steps and 8 in steps
    assert client.get_run(stage1.run_id).info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(stage1.run_id, "perceiver")}
    assert {"perceiver/perceiver.json", "perceiver/prompts.safetensors", "perceiver/clip.safetensors"} <= artifacts
    assert len(client.list_artifacts(stage1.run_id, "medium_tier")) == 3
    fs, path = filesystem(f"{env['bucket']}/ray/stage1-test", env["options"])
    checkpoints = sorted(e["name"] for e in fs.ls(path, detail=True)
                         if e["type"] == "directory" and Path(e["name"]).name.startswith("checkpoint_"))
    assert len(checkpoints) == 2  # keep_last: 2 of the checkpoints at steps 4 and 8 (and 4 again after the restart)
    files = {Path(p).name for p in fs.find(checkpoints[-1])}
    assert {"trainer_state.json", "rng_rank0.safetensors", "rng_rank1.safetensors"} <= files
    assert any(name.startswith("zero_pp_rank_1") for name in files)  # both ranks' DeepSpeed shards merged


def test_workers_of_the_local_ray_run_at_normal_priority(stage1):
    """Ray nices its workers to 15 by default; the job's local Ray starts them at the configured 0."""
    import ray

    @ray.remote(num_cpus=1)
    def niceness() -> int:
        return os.nice(0)

    assert ray.get(niceness.remote()) == 0


def test_stage2_stopped_then_relaunched_continues_in_the_same_run(env, stage1, ray_session, monkeypatch_module):
    from mlflow.tracking import MlflowClient

    from perceive_ir.orchestration.trainer import launch

    monkeypatch_module.chdir(REPO)
    overrides = env["common"] + [
        "name=stage2-test", f"perceiver=runs:/{stage1.run_id}/perceiver", f"medium_tier=runs:/{stage1.run_id}/medium_tier",
        "loop.max_steps=6", "loop.checkpoint_every=2", "loop.val_every=3", "loop.log_every=1",
        "loss.l3=0.1",  # every stage-2 term (the tiny profile leaves L_dpl off)
        f"storage.path={env['bucket']}/ray", f"storage.endpoint_url={env['options']['endpoint_url']}",
    ]
    first = launch("stage2", load_config(Stage2Config, REPO / "configs/stage2_tiny.yaml", overrides + ["loop.stop_after_steps=3"]), REPO)
    second = launch("stage2", load_config(Stage2Config, REPO / "configs/stage2_tiny.yaml", overrides), REPO)
    assert first.run_id == second.run_id
    client = MlflowClient(tracking_uri=second.tracking_uri)
    assert len(runs_named(client, "jobs-test", "stage2-test")) == 1
    run = client.get_run(second.run_id)
    assert metric_history(client, run.info.run_id, "resumed_from_step") == [(3, 3.0)]
    assert [s for s, _ in metric_history(client, run.info.run_id, "train/total")] == [1, 2, 3, 4, 5, 6]
    # the schedule continued across the relaunch: exactly warm-up (5 steps) then cosine, lr 2e-3 -> 1e-5
    factor = phase_factor(0, 6, 5, 1e-5 / 2e-3)
    expected = [(s, 2e-3 * factor(s)) for s in range(1, 7)]
    lr = metric_history(client, run.info.run_id, "lr/restorer")
    assert [s for s, _ in lr] == [1, 2, 3, 4, 5, 6]
    assert all(math.isclose(a, b, rel_tol=1e-6) for (_, a), (_, b) in zip(lr, expected)), (lr, expected)
    for key in ("train/rec", "train/cl", "train/clip", "train/dpl", "samples_per_s", "skipped_samples",
                "train/quality_out", "val/haze/psnr_out", "val/gaussian_noise/ssim_in", "val/mean/quality_out"):
        assert key in run.data.metrics, key
    assert run.data.params["loop.max_steps"] == "6" and run.data.params["ray.num_workers"] == "2"
    assert run.data.tags["launches"] == "2" and run.data.tags["version.deepspeed"]
    assert {"git_commit", "version.torch", "version.ray"} <= set(run.data.tags)
    assert not any("secret" in k.lower() or "local-test" in v for k, v in run.data.params.items())
    paths = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config", "restorer", "validation_grids"} <= paths
    assert {a.path for a in client.list_artifacts(run.info.run_id, "restorer")} >= {"restorer/model.safetensors"}


def test_ray_job_submit_runs_stage2_on_a_local_cluster(env, stage1, ray_session, tmp_path):
    import ray
    from mlflow.tracking import MlflowClient

    ray.shutdown()  # the in-process Ray of the other tests; the job gets its own cluster
    ports = {name: _free_port() for name in ("port", "dashboard", "client", "agent", "metrics", "runtime_env", "agent_grpc")}
    # As a user with the environment activated: `python` in the job's entrypoint is this venv's.
    venv_bin = str(Path(sys.executable).parent)
    shell_env = dict(os.environ, RAY_AUTH_MODE="token", HF_HUB_OFFLINE="1",
                     PATH=venv_bin + os.pathsep + os.environ.get("PATH", ""))
    ray_bin = str(Path(venv_bin) / "ray")
    temp_dir = tempfile.mkdtemp(prefix="rayjob")
    head = subprocess.Popen(
        [ray_bin, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={ports['port']}",
         "--num-cpus=2", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={ports['dashboard']}", f"--ray-client-server-port={ports['client']}",
         f"--dashboard-agent-listen-port={ports['agent']}", f"--metrics-export-port={ports['metrics']}",
         f"--runtime-env-agent-port={ports['runtime_env']}", f"--dashboard-agent-grpc-port={ports['agent_grpc']}",
         f"--temp-dir={temp_dir}"],
        env=shell_env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, text=True)
    address = f"http://127.0.0.1:{ports['dashboard']}"
    try:
        overrides = [o for o in env["common"]] + [
            "name=stage2-submitted", "perceiver=models:/jobs-test-perceiver/1", "loop.max_steps=2",
            "loop.checkpoint_every=2", "loop.val_every=2", "loop.log_every=1", f"storage.path={tmp_path / 'ray'}"]
        submit = [ray_bin, "job", "submit", "--address", address, "--working-dir", ".", "--",
                  "python", "jobs/stage2.py", "--config", "configs/stage2_tiny.yaml", *overrides]
        deadline = time.time() + 120
        while True:  # the dashboard needs a few seconds after the head is up
            out = subprocess.run([ray_bin, "job", "list", "--address", address], env=shell_env, cwd=REPO,
                                 capture_output=True, text=True)
            if out.returncode == 0 or time.time() > deadline or head.poll() is not None:
                break
            time.sleep(2)
        assert out.returncode == 0, out.stdout + out.stderr
        job = subprocess.run(submit, env=shell_env, cwd=REPO, capture_output=True, text=True, timeout=600)
        assert job.returncode == 0 and "succeeded" in job.stdout, job.stdout[-3000:] + job.stderr[-3000:]
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=60)
    client = MlflowClient(tracking_uri=env["uri"])
    (run,) = runs_named(client, "jobs-test", "stage2-submitted")
    assert run.info.status == "FINISHED"
    assert [s for s, _ in metric_history(client, run.info.run_id, "train/total")] == [1, 2]
    assert "val/mean/psnr_out" in run.data.metrics
    assert not (REPO / "runs" / "ray" / "stage2-submitted").exists()  # nothing written into the checkout
