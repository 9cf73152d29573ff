"""Watching a local Ray Train run from outside: its checkpoints' counters, and waiting on a condition."""

from __future__ import annotations

import json
import time
from pathlib import Path

__all__ = ["checkpoint_states", "wait_for"]


def checkpoint_states(storage: Path) -> list[dict]:
    """The counters (``trainer_state.json``) of every complete checkpoint in the run storage, oldest first."""
    states = []
    for path in storage.glob("*/checkpoint_*/trainer_state.json"):
        try:
            states.append(json.loads(path.read_text()))
        except ValueError:  # being written
            continue
    return sorted(states, key=lambda s: s["step"])


def wait_for(condition, what: str, timeout_s: float = 300.0):
    """``condition()``'s first truthy value; raises TimeoutError naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.1)
    raise TimeoutError(f"timed out waiting for {what}")
