"""Pre-flight: every input of a training job is checked on the driver before Ray starts, and each
failure is one line naming the setting. Relative local paths follow the launch folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from _train_fixtures import build_tiny_shards
from conftest import REPO, _free_port
from perceive_ir.config import load_config
from perceive_ir.orchestration.config import Stage1Config, Stage2Config
from perceive_ir.orchestration.preflight import PreflightError, placement, preflight, resolve_paths

sys.path.insert(0, str(REPO / "jobs"))
import _common  # noqa: E402


@pytest.fixture(scope="module")
def launch_dir(package_photos, tmp_path_factory) -> Path:
    """A folder to launch jobs from, as the repository's root is: configs/ and the stage-2 inputs
    under relative paths."""
    root = tmp_path_factory.mktemp("launch")
    (root / "configs").symlink_to(REPO / "configs")
    build_tiny_shards(package_photos, str(root / "runs" / "quickstart" / "shards"))
    (root / "stage1" / "perceiver").mkdir(parents=True)
    (root / "stage1" / "perceiver" / "perceiver.json").write_text("{}")
    (root / "stage1" / "medium_tier").mkdir()
    (root / "stage1" / "medium_tier" / "medium_tier.json").write_text(json.dumps({"k": 2}))
    (root / "stage1" / "medium_tier" / "fold_0.safetensors").write_bytes(b"")
    return root


def stage2(launch_dir: Path, *overrides: str) -> Stage2Config:
    return load_config(Stage2Config, REPO / "configs/stage2_tiny.yaml", [
        "perceiver=stage1/perceiver", f"tracking.uri=sqlite:///{launch_dir / 'mlflow.db'}", *overrides])


def test_relative_paths_follow_the_launch_folder_and_reach_the_workers_absolute(launch_dir, monkeypatch):
    monkeypatch.chdir(launch_dir)
    cfg = load_config(Stage1Config, "configs/stage1_tiny.yaml", [f"tracking.uri=sqlite:///{launch_dir / 'mlflow.db'}"])
    preflight("stage1", cfg, working_dir=REPO)
    assert cfg.data.train.sources[0].location == str(launch_dir / "runs/quickstart/shards")
    assert cfg.storage.path == str(launch_dir / "runs/ray")
    assert cfg.engine.deepspeed_config == str(launch_dir / "configs/deepspeed/zero1.json")
    assert cfg.perceiver.arch_config == str(launch_dir / "configs/models/clip_tiny.json")
    assert (launch_dir / "runs/ray").is_dir() and not list((launch_dir / "runs/ray").iterdir())  # probe removed


def test_a_remote_cluster_takes_repository_files_and_refuses_other_local_paths(launch_dir, monkeypatch):
    monkeypatch.chdir(REPO)
    remote = ["ray.address=ray://10.20.30.40:10001", "storage.path=s3://bucket/ray"]
    cfg = stage2(launch_dir, *remote, "data.train.sources=[{location: s3://bucket/shards}]", "perceiver=s3://b/p",
                 "engine.deepspeed_config=" + str(REPO / "configs/deepspeed/zero1.json"))
    resolve_paths(cfg, placement(cfg, REPO))
    assert cfg.engine.deepspeed_config == "configs/deepspeed/zero1.json"  # travels with the repository
    cfg = stage2(launch_dir, *remote, f"data.train.sources=[{{location: {launch_dir / 'runs/quickstart/shards'}}}]")
    with pytest.raises(PreflightError, match=r"'data.train.sources\[0\].location': .* outside the uploaded "
                                             r"repository.* ray.address 'ray://10.20.30.40:10001' is a remote"):
        preflight("stage2", cfg, working_dir=REPO)
    cfg = stage2(launch_dir, *remote)
    with pytest.raises(PreflightError, match=r"'data.train.sources\[0\].location': 'runs/quickstart/shards' .*"
                                             r"'runs' is not uploaded with the repository"):
        preflight("stage2", cfg, working_dir=REPO)


def test_a_submitted_job_refuses_a_storage_path_inside_its_temporary_copy(launch_dir, monkeypatch):
    monkeypatch.chdir(launch_dir)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"working_dir": "."}}))
    cfg = stage2(launch_dir, f"data.train.sources=[{{location: {launch_dir / 'runs/quickstart/shards'}}}]")
    with pytest.raises(PreflightError, match="'storage.path': 'runs/ray' is a local folder, but this is a job submitted"):
        preflight("stage2", cfg, working_dir=launch_dir)


def _closed_port_url() -> str:
    return f"http://127.0.0.1:{_free_port()}"


FAILURES = {  # override -> (setting named in the one-line error, words of it, exit code)
    "shards": (["data.train.sources=[{location: runs/none}]"], "data.train.sources[0].location",
               "no shard manifest", 2),
    "manifest": (["data.train.sources=[{location: bad_manifest}]"], "data.train.sources[0].location",
                 "not a valid shard manifest", 2),
    "perceiver": (["perceiver=stage1/none"], "perceiver", "does not exist", 2),
    "not_a_product": (["perceiver=runs/quickstart/shards"], "perceiver", "not a perceiver folder (no perceiver.json)", 2),
    "medium_tier": (["medium_tier=stage1/medium_tier"], "medium_tier", "lacks fold_1.safetensors", 2),
    "mlflow_run": (["perceiver=runs:/0123456789abcdef0123456789abcdef/perceiver"], "perceiver",
                   "cannot be resolved in sqlite", 2),
    "registered": (["perceiver=models:/nobody-perceiver/1"], "perceiver", "cannot be resolved", 2),
    "tracking": ([f"tracking.uri={_closed_port_url()}"], "tracking.uri", "does not answer", 1),
    "storage": (["storage.path=runs/quickstart/shards/manifest.json/ray"], "storage.path", "cannot be written", 2),
    "s3_storage": (["storage.path=s3://bucket/ray", f"storage.endpoint_url={_closed_port_url()}"], "storage.path",
                   "cannot be reached", 1),
    "deepspeed": (["engine.deepspeed_config=configs/deepspeed/none.json"], "engine.deepspeed_config",
                  "does not exist", 2),
}


@pytest.mark.parametrize("case", sorted(FAILURES))
def test_each_failure_is_one_line_naming_the_setting_before_ray_starts(case, launch_dir, monkeypatch, capsys):
    import ray

    overrides, setting, words, code = FAILURES[case]
    (launch_dir / "bad_manifest").mkdir(exist_ok=True)
    (launch_dir / "bad_manifest" / "manifest.json").write_text('{"shards": [{"name": 1}]}')
    monkeypatch.chdir(launch_dir)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    args = ["--config", str(REPO / "configs/stage2_tiny.yaml"), "perceiver=stage1/perceiver",
            f"tracking.uri=sqlite:///{launch_dir / 'mlflow.db'}", *overrides]
    assert _common.main("stage2", "", args) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"stage2: pre-flight: '{setting}': ") and words in err[-1], err
    assert "Traceback" not in "\n".join(err)
    assert not ray.is_initialized()


def test_a_job_that_fails_pre_flight_creates_no_ray_session(launch_dir):
    ray_tmp = Path(tempfile.mkdtemp(prefix="r"))  # short: Ray's socket paths live under it
    env = dict(os.environ, RAY_TMPDIR=str(ray_tmp), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(REPO / "jobs/stage2.py"), "--config", str(REPO / "configs/stage2_tiny.yaml"),
                           "perceiver=stage1/missing", f"tracking.uri=sqlite:///{launch_dir / 'mlflow.db'}"],
                          cwd=launch_dir, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"'perceiver': folder '{launch_dir / 'stage1/missing'}' does not exist" in proc.stderr
    assert list(ray_tmp.iterdir()) == []  # Ray writes its session folder there first thing
    ray_tmp.rmdir()


def test_the_pipeline_and_a_search_run_the_pre_flight_before_ray_starts(launch_dir, capsys):
    """The pipeline checks each stage before launching it; a search checks its base stage-2 config."""
    import ray
    import yaml

    import pipeline
    import tune

    shards = f"data.train.sources=[{{location: {launch_dir / 'runs/quickstart/shards'}}}]"
    cfg = stage2(launch_dir, shards, f"perceiver={launch_dir / 'stage1/missing'}")
    with pytest.raises(SystemExit) as stopped:
        pipeline.checked_launch("stage2", cfg)
    assert stopped.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("pipeline: stage2 pre-flight: 'perceiver': folder")
    search = launch_dir / "search.yaml"
    search.write_text(yaml.safe_dump({
        "name": "preflight", "base": str(REPO / "configs/stage2_tiny.yaml"), "space": {"loss.l1": {"grid": [0.1]}},
        "stage2": {"perceiver": str(launch_dir / "stage1/missing"), "storage": {"path": str(launch_dir / "ray")},
                   "data": {"train": {"sources": [{"location": str(launch_dir / "runs/quickstart/shards")}]}},
                   "tracking": {"uri": f"sqlite:///{launch_dir / 'mlflow.db'}"}}}))
    assert tune.main(["--config", str(search)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"tune: pre-flight of the base stage-2 config: 'perceiver': folder "
                       f"'{launch_dir / 'stage1/missing'}' does not exist"), err
    assert not ray.is_initialized()


def test_run_storage_takes_the_endpoint_variable_when_the_config_sets_none(monkeypatch):
    from perceive_ir.orchestration.config import RunStorageConfig
    from perceive_ir.orchestration.storage import StorageUnreachable, run_storage

    url = _closed_port_url()
    for name, value in {"AWS_ACCESS_KEY_ID": "local-test", "AWS_SECRET_ACCESS_KEY": "local-test",
                        "AWS_ENDPOINT_URL": url}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(StorageUnreachable, match=f"endpoint {url} \\(from AWS_ENDPOINT_URL\\)\\) cannot be reached"):
        run_storage(RunStorageConfig(path="s3://bucket/ray"))


def test_a_relaunch_that_changes_what_the_checkpoints_rest_on_is_refused(launch_dir, monkeypatch):
    """A relaunch under a run's name resumes its checkpoints: the model, loss, optimizer or data
    settings must be the run's; the cluster, the step counts and the intervals may change."""
    from perceive_ir.config import flatten
    from perceive_ir.tracking import find_or_create_run

    monkeypatch.chdir(launch_dir)
    first = stage2(launch_dir, "name=relaunch-check")
    preflight("stage2", first, working_dir=REPO)  # no run of that name yet
    find_or_create_run(first.tracking, first.name, flatten(first), {}, "stage2")  # what launch() then does
    # fewer workers, the same global batch (2 micro-batches accumulated): the same experiment
    preflight("stage2", stage2(launch_dir, "name=relaunch-check", "ray.num_workers=1", "engine.global_batch=8",
                               "loop.max_steps=900", "loop.val_every=50"), working_dir=REPO)
    with pytest.raises(PreflightError, match=r"engine.global_batch '8' -> '4'"):  # fewer workers, smaller batch
        preflight("stage2", stage2(launch_dir, "name=relaunch-check", "ray.num_workers=1"), working_dir=REPO)
    changed = stage2(launch_dir, "name=relaunch-check", "loss.l3=0.1", "restorer.backbone.params.width=16")
    with pytest.raises(PreflightError, match=r"^'name': a run named 'relaunch-check' \(MLflow run \w+\) was started "
                                             r"with other settings \(loss.l3 '0.0' -> '0.1'; "
                                             r"restorer.backbone.params.width '8' -> '16'\).*another name"):
        preflight("stage2", changed, working_dir=REPO)
    preflight("stage2", stage2(launch_dir, "name=relaunch-check-2", "loss.l3=0.1"), working_dir=REPO)
