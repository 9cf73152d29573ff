"""Where a job's Ray comes from (orchestration/ray_runtime.connect): a job without an address starts a
Ray of its own, even where an earlier `ray start` on the machine left the address of its cluster behind
(the file that a bare ``ray.init()`` follows, to a dead cluster or to a live one of somebody else)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow

JOIN = """
import sys
sys.path.insert(0, "platform")
import ray
from perceive_ir.orchestration.config import RaySettings
from perceive_ir.orchestration.ray_runtime import connect
connect(RaySettings(local_cpus=1), None)
print("cpus", ray.cluster_resources().get("CPU"), "gcs", ray.get_runtime_context().gcs_address)
ray.shutdown()
"""


@pytest.fixture
def ray_temp_root():
    # Ray's socket paths must stay short: not under pytest's long temporary folders
    root = Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _job(ray_temp_root: Path) -> subprocess.CompletedProcess:
    shell = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "TMPDIR")}
    shell["RAY_TMPDIR"] = str(ray_temp_root)
    return subprocess.run([sys.executable, "-c", JOIN], cwd=REPO, env=shell, capture_output=True, text=True,
                          timeout=300)


def test_a_local_job_starts_its_own_ray_despite_a_stale_cluster_address(ray_temp_root):
    stale = ray_temp_root / "ray" / "ray_current_cluster"
    stale.parent.mkdir()
    stale.write_text("127.0.0.1:9")  # a cluster that is gone: a bare ray.init() waits for it, then fails
    run = _job(ray_temp_root)
    assert run.returncode == 0, run.stderr[-3000:]
    cpus, gcs = run.stdout.split()[1], run.stdout.split()[3]
    assert float(cpus) == 1.0 and not gcs.endswith(":9")

