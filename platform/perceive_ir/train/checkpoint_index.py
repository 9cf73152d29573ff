"""A checkpoint's index: each rank lists the files it wrote (size, sha256) in ``index_rank{r}.json``,
written after everything else. A checkpoint is complete when every rank's index is there and every
listed file has its size and digest; resume takes the newest complete one."""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ContextManager, Iterable, Iterator, Optional

from perceive_ir.weights import sha256_file

log = logging.getLogger(__name__)

__all__ = ["write_index", "index_problems", "Candidate", "Selection", "select_checkpoint", "NoValidCheckpoint"]

INDEX_PREFIX = "index_rank"


class NoValidCheckpoint(RuntimeError):
    """Every checkpoint kept for the run is incomplete or corrupt."""


def _is_index(path: Path) -> bool:
    return path.name.startswith(INDEX_PREFIX) and path.suffix == ".json"


def write_index(directory: str | Path, rank: int, world_size: int, step: int) -> Path:
    """Index every file under ``directory`` (this rank's part of the checkpoint); call it last."""
    directory = Path(directory)
    files = {str(p.relative_to(directory)): {"size": p.stat().st_size, "sha256": sha256_file(p)}
             for p in sorted(directory.rglob("*")) if p.is_file() and not _is_index(p)}
    path = directory / f"{INDEX_PREFIX}{rank}.json"
    path.write_text(json.dumps({"rank": rank, "world_size": world_size, "step": step, "files": files}, indent=1))
    return path


def index_problems(directory: str | Path) -> list[str]:
    """What is wrong with the checkpoint in ``directory`` (empty: complete and intact)."""
    directory = Path(directory)
    first = directory / f"{INDEX_PREFIX}0.json"
    if not first.is_file():
        return [f"no {first.name} (the checkpoint was not completely written)"]
    try:
        world_size = int(json.loads(first.read_text())["world_size"])
    except (ValueError, KeyError, TypeError) as err:
        return [f"{first.name} is unreadable: {err}"]
    problems: list[str] = []
    for rank in range(world_size):
        path = directory / f"{INDEX_PREFIX}{rank}.json"
        try:
            files = json.loads(path.read_text())["files"]
        except FileNotFoundError:
            problems.append(f"no {path.name}: rank {rank}'s part is missing")
            continue
        except (ValueError, KeyError, TypeError) as err:
            problems.append(f"{path.name} is unreadable: {err}")
            continue
        for name, expected in files.items():
            file = directory / name
            if not file.is_file():
                problems.append(f"{name} (rank {rank}) is missing")
            elif file.stat().st_size != expected["size"]:
                problems.append(f"{name} (rank {rank}) has {file.stat().st_size} bytes, {expected['size']} expected")
            elif sha256_file(file) != expected["sha256"]:
                problems.append(f"{name} (rank {rank}) does not match its sha256")
    return problems


@dataclass
class Candidate:
    """One checkpoint of the run: its name (for messages) and how to get a local copy of it."""

    name: str
    local_copy: Callable[[], ContextManager[str]]


@dataclass
class Selection:
    directory: Optional[str] = None  # the checkpoint to resume from (None: start afresh)
    name: Optional[str] = None
    rejected: list[str] = field(default_factory=list)  # newer checkpoints found broken, with why


@contextlib.contextmanager
def select_checkpoint(candidates: Iterable[Candidate]) -> Iterator[Selection]:
    """The newest intact checkpoint among ``candidates`` (newest first), copied locally for the
    duration; broken ones are skipped with a warning. Raises :class:`NoValidCheckpoint` when there
    are checkpoints but none is intact; yields an empty selection when there are none."""
    rejected: list[str] = []
    for candidate in candidates:
        with candidate.local_copy() as directory:
            problems = index_problems(directory)
            if not problems:
                if rejected:
                    log.warning("resuming from checkpoint %s: newer ones are broken: %s", candidate.name,
                                " | ".join(rejected))
                yield Selection(directory, candidate.name, rejected)
                return
            rejected.append(f"{candidate.name}: {'; '.join(problems[:4])}")
            log.warning("checkpoint %s is broken, trying an older one: %s", candidate.name, "; ".join(problems[:4]))
    if rejected:
        raise NoValidCheckpoint("no intact checkpoint to resume from; every kept checkpoint is broken: "
                                + " | ".join(rejected) + " (storage.keep_last sets how many are kept)")
    yield Selection()
