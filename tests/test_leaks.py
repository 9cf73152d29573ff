"""No leaks: the documented stand-alone stage commands (docs/training.md), run as printed from a launch
folder (a stage-1 job killed with SIGKILL, launched again, then stage 2 on its products through MLflow),
leave the temporary folder and the process table as they found them; products are downloaded once per
node."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest

from _train_fixtures import build_tiny_shards
from conftest import REPO
from perceive_ir.data.node_cache import cached_download

pytestmark = pytest.mark.slow

SMALL = ["data.validation.images=2", "data.validation.types=[haze]", "data.validation.patch_size=32",
         "data.train.samples_per_epoch=16", "data.train.patch_size=32", "loop.log_every=1"]
STAGE1 = ["python", "jobs/stage1.py", "--config", "configs/stage1_tiny.yaml"]  # as docs/training.md prints them
STAGE2 = ["python", "jobs/stage2.py", "--config", "configs/stage2_tiny.yaml"]


class Launcher:
    """Runs job commands from a launch folder with a private temporary folder, and finds every
    process they started (by an environment mark that children inherit)."""

    def __init__(self, root: Path) -> None:
        self.root, self.mark, self.stage1_run = root, uuid.uuid4().hex, ""
        self.tmp = Path(tempfile.mkdtemp(prefix="t"))
        self.ray_tmp = Path(tempfile.mkdtemp(prefix="r"))  # short: Ray's socket paths live under it
        self.env = dict(os.environ, TMPDIR=str(self.tmp), RAY_TMPDIR=str(self.ray_tmp), HF_HUB_OFFLINE="1",
                        PERCEIVE_IR_TEST_MARK=self.mark, PATH=str(Path(sys.executable).parent) + os.pathsep +
                        os.environ.get("PATH", ""))
        self.env.pop("PERCEIVE_IR_CACHE", None)  # set by jobs run earlier in this process: the node's default here

    def start(self, command: list[str]) -> subprocess.Popen:
        return subprocess.Popen(command, cwd=self.root, env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)

    def run(self, command: list[str]) -> str:
        proc = self.start(command)
        out, _ = proc.communicate(timeout=900)
        assert proc.returncode == 0, out[-4000:]
        return out

    def temp_entries(self) -> set[str]:
        """What jobs leave in the temporary folder, caches aside (products, torch's compiled kernels)."""
        return {p.name for p in self.tmp.iterdir()
                if p.name not in ("perceive_ir_cache", "perceive_ir_jobs") and not p.name.startswith("torchinductor_")} | {
            f"perceive_ir_jobs/{p.name}" for p in self.tmp.glob(f"perceive_ir_jobs/{os.getuid()}/*")}

    def processes(self) -> list[int]:
        found = []
        for entry in Path("/proc").iterdir():
            try:
                if entry.name.isdigit() and f"PERCEIVE_IR_TEST_MARK={self.mark}".encode() in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
        return found

    def wait_for_no_processes(self, patience_s: float = 180) -> list[int]:
        deadline = time.monotonic() + patience_s
        while self.processes() and time.monotonic() < deadline:
            time.sleep(1)
        return self.processes()


@pytest.fixture(scope="module")
def launcher(package_photos, tmp_path_factory) -> Launcher:
    root = tmp_path_factory.mktemp("launch")
    for name in ("jobs", "configs"):
        (root / name).symlink_to(REPO / name)
    build_tiny_shards(package_photos, str(root / "runs" / "quickstart" / "shards"))
    launcher = Launcher(root)
    yield launcher
    shutil.rmtree(launcher.tmp, ignore_errors=True)
    shutil.rmtree(launcher.ray_tmp, ignore_errors=True)


def run_id(output: str) -> str:
    return re.findall(r"^MLFLOW_RUN_ID=(\w+)$", output, re.M)[-1]


def test_a_killed_job_leaves_nothing_behind_and_its_relaunch_continues(launcher):
    assert launcher.temp_entries() == set() and launcher.processes() == []
    stage1 = STAGE1 + SMALL + ["restorer_steps=2", "prompt_steps=2", "loop.checkpoint_every=2", "loop.val_every=4"]

    killed = launcher.start(stage1)  # SIGKILL of the driver once the first checkpoint is stored
    checkpoints = launcher.root / "runs" / "ray" / "stage1-tiny"
    deadline = time.monotonic() + 800
    while killed.poll() is None and not list(checkpoints.glob("checkpoint_*")) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert killed.poll() is None, killed.communicate()[0][-4000:]
    killed.send_signal(signal.SIGKILL)
    killed.communicate()
    assert launcher.wait_for_no_processes() == []  # the job's local Ray went with its driver

    out = launcher.run(stage1)  # the same command again continues the run
    assert "resum" in out.lower()
    assert launcher.wait_for_no_processes() == [] and launcher.temp_entries() == set()
    launcher.stage1_run = run_id(out)


def test_stage2_on_stage1_products_leaves_nothing_behind_and_downloads_each_once(launcher):
    stage1_run = launcher.stage1_run
    assert stage1_run, "needs the stage-1 run of the test above"
    out = launcher.run(STAGE2 + SMALL + [f"perceiver=runs:/{stage1_run}/perceiver",
                                         f"medium_tier=runs:/{stage1_run}/medium_tier",
                                         "loop.max_steps=2", "loop.checkpoint_every=2", "loop.val_every=2"])
    assert run_id(out) != stage1_run
    assert launcher.wait_for_no_processes() == [] and launcher.temp_entries() == set()
    cache = launcher.tmp / "perceive_ir_cache" / str(os.getuid()) / "products"
    entries = [p for p in cache.iterdir() if p.is_dir()]  # both workers of the node shared one download each
    assert len(entries) == 2 and not list(cache.glob(".*partial*")), sorted(p.name for p in cache.iterdir())


def test_concurrent_downloads_of_one_product_fetch_it_once(tmp_path, monkeypatch):
    monkeypatch.setenv("PERCEIVE_IR_CACHE", str(tmp_path / "cache"))
    fetches, results, started = [], [], threading.Barrier(4)

    def fetch(folder: Path) -> Path:
        fetches.append(folder)
        (folder / "product").mkdir()
        (folder / "product" / "weights.bin").write_bytes(os.urandom(1 << 16))
        time.sleep(0.2)  # a slow download: the other callers must wait, not start their own
        return folder / "product"

    def worker() -> None:
        started.wait()
        results.append(cached_download({"uri": "runs:/abc/product"}, fetch))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(fetches) == 1 and len(set(results)) == 1 and (results[0] / "weights.bin").stat().st_size == 1 << 16
    (results[0] / "weights.bin").write_bytes(b"truncated")  # a damaged entry is fetched again
    stale = tmp_path / "cache" / "products" / f".{results[0].parent.name}.partial-killed"
    stale.mkdir()  # left by a process killed mid-download
    assert cached_download({"uri": "runs:/abc/product"}, fetch) == results[0] and len(fetches) == 2
    assert not stale.exists() and (results[0] / "weights.bin").stat().st_size == 1 << 16
