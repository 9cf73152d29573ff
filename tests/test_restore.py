"""Batch restoration (jobs/restore.py on Ray Data): the cases of tests/restoration_cases.py, run in a
pytest process of their own, as a user's job runs in a fresh process.

Ray reads its authentication mode once, when it is imported, and the first local ``ray.init`` of a
process sets ``RAY_AUTH_MODE=token`` in that process's environment when it was unset; a fresh
process inherits that setting from the suite, and the cases' cluster and jobs keep to it (a mode
changed after the import made every Ray Data actor fail to start). This wrapper fails with the
cases' output when one fails.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1300)]


def test_every_batch_restoration_case_passes_in_a_process_of_its_own():
    cases = Path(__file__).with_name("restoration_cases.py")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA", str(cases)],
                         cwd=REPO, capture_output=True, text=True, timeout=1200)
    print(run.stdout[-8000:])
    assert run.returncode == 0, run.stdout[-8000:] + run.stderr[-3000:]
    assert " passed" in run.stdout and " failed" not in run.stdout
