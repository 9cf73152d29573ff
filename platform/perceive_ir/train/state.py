"""Where a run stands, saved next to DeepSpeed's shards in every checkpoint.

``trainer_state.json`` holds the counters (same on every rank); ``rng_rank{r}.safetensors`` and
``rng_rank{r}.json`` hold each rank's random generators. Nothing here is pickled, so loading a
checkpoint never executes code.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ["TrainState", "save_state", "load_state", "read_state", "CHECKPOINT_TAG"]

CHECKPOINT_TAG = "checkpoint"  # DeepSpeed's sub-folder inside each reported checkpoint
STATE_FILE = "trainer_state.json"


@dataclass
class TrainState:
    step: int = 0  # optimiser steps done: with the global batch, also the data position
    samples: int = 0  # over all ranks
    validations: int = 0
    world_size: int = 1  # of the launch that wrote the checkpoint
    global_batch: int = 0  # samples per optimiser step (0: a checkpoint older than the field)
    preempted: bool = False  # written because a node announced its reclaim
    saved_unix: float = 0.0  # when the checkpoint was written (the time lost to a restart starts here)


def _rng_tensors() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["cuda"] = torch.cuda.get_rng_state()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(keys.astype(np.int64))
    version, internal, gauss = random.getstate()
    tensors["python"] = torch.tensor(internal, dtype=torch.int64)
    return tensors, {"numpy": [int(pos), int(has_gauss), float(cached)], "python": [version, gauss]}


def _set_rng(tensors: dict[str, torch.Tensor], extra: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])
    pos, has_gauss, cached = extra["numpy"]
    np.random.set_state(("MT19937", tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, gauss = extra["python"]
    random.setstate((version, tuple(int(v) for v in tensors["python"].tolist()), gauss))


def save_state(directory: str | Path, state: TrainState, rank: int) -> None:
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        (directory / STATE_FILE).write_text(json.dumps(asdict(state), indent=2))
    tensors, extra = _rng_tensors()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / f"rng_rank{rank}.safetensors"))
    (directory / f"rng_rank{rank}.json").write_text(json.dumps(extra))


def read_state(directory: str | Path) -> TrainState:
    """The counters of a checkpoint; fails clearly on a foreign or partial checkpoint."""
    directory = Path(directory)
    path = directory / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint '{directory}' has no {STATE_FILE}: not a checkpoint of this trainer")
    known = set(TrainState.__dataclass_fields__)
    return TrainState(**{k: v for k, v in json.loads(path.read_text()).items() if k in known})


def load_state(directory: str | Path, rank: int, world_size: int) -> TrainState:
    """Counters, and this rank's random state when the checkpoint was written by as many ranks
    (after a resize the ranks hold other slices of the work: their generators start afresh)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    state = read_state(directory)
    rng_file = directory / f"rng_rank{rank}.safetensors"
    if state.world_size == world_size and rng_file.is_file():
        _set_rng(load_file(str(rng_file)), json.loads((directory / f"rng_rank{rank}.json").read_text()))
    return state
