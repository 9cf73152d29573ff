"""The GPU check script runs as it is: its CPU dry run passes wherever the tests run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_dry_run_passes_and_writes_its_results_file(tmp_path):
    results = tmp_path / "results.txt"
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(REPO / "benchmarks/gpu_check.sh"), "--dry-run", "--out", str(results)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    text = results.read_text()
    assert "=== stage 1 + stage 2 smoke run (CPU)" in text and "stage 2:" in text and "steps/s" in text
    assert "all steps passed" in text and "FAILED" not in text


def test_gpu_check_refuses_unknown_arguments():
    done = subprocess.run(["bash", str(REPO / "benchmarks/gpu_check.sh"), "--fast"], capture_output=True, text=True)
    assert done.returncode == 2 and "usage:" in done.stderr
