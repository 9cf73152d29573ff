"""Writes to the tracking store from a background thread, so that training never waits on it.

Every write (params, metrics, tags, a dict artifact, a file or folder artifact) becomes an entry of
one FIFO queue; a single flusher thread writes the head entry and, when the store cannot be
reached, retries it with a growing pause (never skipping ahead: the store receives everything in
the order it was logged). Artifacts are copied to a local spool folder when they are logged (the
caller may delete its copy at once) and removed from it once uploaded.

The queue is bounded in metric points: beyond ``max_metric_points`` the oldest pending points are
dropped and counted; the count is written to the run (metric and tag ``tracking/dropped_metric_points``)
once the store answers again. :meth:`TrackingBuffer.drain` waits for the queue to empty, up to a limit;
:meth:`TrackingBuffer.close` then raises :class:`TrackingNotDrained`, naming what was not written and
where it was left on disk.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

log = logging.getLogger(__name__)

__all__ = ["BufferSettings", "TrackingBuffer", "TrackingNotDrained", "DROPPED_METRIC", "limit_client_retries"]

DROPPED_METRIC = "tracking/dropped_metric_points"


class TrackingNotDrained(RuntimeError):
    """The store did not take everything before the drain limit."""


@dataclass
class BufferSettings:
    max_metric_points: int = 100_000  # pending metric points kept while the store is away
    drain_timeout_s: float = 600.0  # how long the end of a job waits for the store
    retry_max_interval_s: float = 10.0  # the pause between tries grows to this
    spool_dir: Optional[str] = None  # None: see default_spool_root()


@dataclass
class _Entry:
    kind: str  # params | metrics | tags | dict | file | folder
    payload: Any
    step: int = 0
    spooled: Optional[Path] = None
    artifact_path: Optional[str] = None

    def describe(self) -> str:
        if self.kind == "metrics":
            return f"{len(self.payload)} metric points at step {self.step}"
        if self.kind in ("file", "folder"):
            return f"{self.kind} artifact '{self.artifact_path or ''}' spooled at {self.spooled}"
        if self.kind == "dict":
            return f"artifact '{self.artifact_path}'"
        return f"{len(self.payload)} {self.kind}"


def _permanent(err: Exception) -> bool:
    """A request the store refused (a 4xx other than 429): retrying it cannot succeed."""
    code = getattr(err, "get_http_status_code", lambda: None)()
    return isinstance(code, int) and 400 <= code < 500 and code != 429


@dataclass
class _Stats:
    dropped: int = 0
    dropped_reported: int = 0
    refused: list[str] = field(default_factory=list)
    last_step: int = 0


class TrackingBuffer:
    """The queue and flusher of one run. ``client``: an ``MlflowClient``; ``run_id``: its run."""

    def __init__(self, client, run_id: str, settings: BufferSettings) -> None:
        self.client, self.run_id, self.settings = client, run_id, settings
        self._queue: collections.deque[_Entry] = collections.deque()
        self._points = 0
        self._busy = False
        self._closed = False
        self._stats = _Stats()
        self._lock = threading.Condition()
        self._spool_root = Path(settings.spool_dir) if settings.spool_dir else default_spool_root()
        self._spool: Optional[Path] = None
        self.last_error: Optional[str] = None
        self._thread = threading.Thread(target=self._run, name=f"tracking-flusher-{run_id[:8]}", daemon=True)
        self._thread.start()

    # ---- producers (the training thread): never block on the store
    def params(self, items: list) -> None:
        self._put(_Entry("params", items))

    def tags(self, tags: dict[str, str]) -> None:
        self._put(_Entry("tags", dict(tags)))

    def metrics(self, items: list, step: int) -> None:
        with self._lock:
            self._stats.last_step = max(self._stats.last_step, step)
        self._put(_Entry("metrics", items, step=step), points=len(items))

    def dict_artifact(self, content: dict, artifact_file: str) -> None:
        self._put(_Entry("dict", json.loads(json.dumps(content)), artifact_path=artifact_file))

    def artifact(self, path: str | Path, artifact_path: Optional[str]) -> None:
        source = Path(path)
        target = self._spool_folder() / uuid.uuid4().hex / source.name
        target.parent.mkdir(parents=True)
        if source.is_dir():
            shutil.copytree(source, target)
        else:
            shutil.copy2(source, target)
        self._put(_Entry("folder" if source.is_dir() else "file", None, spooled=target, artifact_path=artifact_path))

    def _spool_folder(self) -> Path:
        if self._spool is None:
            self._spool_root.mkdir(parents=True, exist_ok=True)
            self._spool = Path(tempfile.mkdtemp(prefix=f"{self.run_id[:12]}-", dir=self._spool_root))
        return self._spool

    def _put(self, entry: _Entry, points: int = 0) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError(f"tracking buffer of run {self.run_id} is closed")
            self._queue.append(entry)
            self._points += points
            self._drop_oldest_points()
            self._lock.notify_all()

    def _drop_oldest_points(self) -> None:
        excess = self._points - self.settings.max_metric_points
        if excess <= 0:
            return
        # The head may be in flight: its points still count as dropped (its retry sends the rest).
        for entry in list(self._queue):
            if excess <= 0:
                break
            if entry.kind != "metrics":
                continue
            cut = min(excess, len(entry.payload))
            entry.payload = entry.payload[cut:]
            self._points -= cut
            self._stats.dropped += cut
            excess -= cut
        self._queue = collections.deque(e for e in self._queue if e.kind != "metrics" or e.payload)

    # ---- the flusher thread
    def _run(self) -> None:
        pause = 0.5
        while True:
            with self._lock:
                while not self._queue and not self._closed and not self._dropped_unreported():
                    self._lock.wait()
                if not self._queue and not self._dropped_unreported():
                    return  # closed and empty
                entry = self._queue[0] if self._queue else self._dropped_entry()
                self._busy = True
            try:
                self._write(entry)
            except Exception as err:  # noqa: BLE001 - the store may fail in any way; keep the entry
                if _permanent(err):
                    self._finish(entry, refused=f"{entry.describe()}: {err}")
                    log.warning("tracking store refused %s: %s", entry.describe(), err)
                    continue
                with self._lock:
                    self._busy = False
                    self.last_error = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
                    self._drop_oldest_points()
                    log.warning("tracking store unreachable (%s); %d entries waiting, retry in %.1f s",
                                self.last_error, len(self._queue), pause)
                    self._lock.wait(timeout=pause)
                pause = min(pause * 2, self.settings.retry_max_interval_s)
                continue
            pause = 0.5
            self._finish(entry)

    def _dropped_unreported(self) -> bool:
        return self._stats.dropped > self._stats.dropped_reported

    def _dropped_entry(self) -> _Entry:
        return _Entry("dropped", self._stats.dropped, step=self._stats.last_step)

    def _finish(self, entry: _Entry, refused: Optional[str] = None) -> None:
        with self._lock:
            if entry.kind == "dropped":
                self._stats.dropped_reported = entry.payload
            elif self._queue and self._queue[0] is entry:
                self._queue.popleft()
                if entry.kind == "metrics":
                    self._points -= len(entry.payload)
            if refused:
                self._stats.refused.append(refused)
            self._busy = False
            self.last_error = None
            self._lock.notify_all()
        if entry.spooled is not None and not refused:
            shutil.rmtree(entry.spooled.parent, ignore_errors=True)

    def _write(self, entry: _Entry) -> None:
        client, run = self.client, self.run_id
        if entry.kind == "metrics":
            for start in range(0, len(entry.payload), 500):
                client.log_batch(run, metrics=entry.payload[start : start + 500])
        elif entry.kind == "params":
            for start in range(0, len(entry.payload), 100):
                client.log_batch(run, params=entry.payload[start : start + 100])
        elif entry.kind == "tags":
            for key, value in entry.payload.items():
                client.set_tag(run, key, value)
        elif entry.kind == "dict":
            client.log_dict(run, entry.payload, entry.artifact_path)
        elif entry.kind == "file":
            client.log_artifact(run, str(entry.spooled), entry.artifact_path)
        elif entry.kind == "folder":
            client.log_artifacts(run, str(entry.spooled), entry.artifact_path)
        elif entry.kind == "dropped":
            from mlflow.entities import Metric

            client.log_batch(run, metrics=[Metric(DROPPED_METRIC, float(entry.payload), int(time.time() * 1000),
                                                  entry.step)])
            client.set_tag(run, DROPPED_METRIC, str(entry.payload))

    # ---- the end
    @property
    def dropped(self) -> int:
        return self._stats.dropped

    def pending(self) -> list[str]:
        with self._lock:
            return [e.describe() for e in self._queue]

    def drain(self, timeout_s: Optional[float] = None) -> bool:
        """Wait until everything logged so far is written; False when the limit passed first."""
        limit = self.settings.drain_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + limit
        with self._lock:
            while self._queue or self._busy or self._dropped_unreported():
                left = deadline - time.monotonic()
                if left <= 0 or not self._thread.is_alive():
                    return False
                self._lock.wait(timeout=min(left, 1.0))
        return True

    def close(self, timeout_s: Optional[float] = None, on_timeout: Optional[Callable[[], None]] = None) -> None:
        """Drain, stop the flusher and remove the spool folder; raises :class:`TrackingNotDrained`
        (after saving what is left under the spool folder) when the store did not take everything."""
        drained = self.drain(timeout_s)
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        if drained:
            self._thread.join(timeout=5)
            if self._spool is not None:
                shutil.rmtree(self._spool, ignore_errors=True)
            if self._stats.refused:
                log.warning("tracking store refused %d entries of run %s: %s", len(self._stats.refused),
                            self.run_id, "; ".join(self._stats.refused[:5]))
            return
        left = self._save_pending()
        raise TrackingNotDrained(
            f"tracking store '{getattr(self.client, 'tracking_uri', '?')}' did not take everything logged to run "
            f"{self.run_id} within {self.settings.drain_timeout_s if timeout_s is None else timeout_s:.0f} s "
            f"(tracking.drain_timeout_s; last error: {self.last_error or 'none'}). Not written: "
            f"{'; '.join(left[:8])}{' ...' if len(left) > 8 else ''}. Saved under {self._spool}")

    def _save_pending(self) -> list[str]:
        """Pending metrics, params and tags as JSON lines beside the spooled artifacts."""
        with self._lock:
            entries = list(self._queue)
        folder = self._spool_folder()
        with open(folder / "pending.jsonl", "w") as out:
            for entry in entries:
                record: dict[str, Any] = {"kind": entry.kind, "artifact_path": entry.artifact_path}
                if entry.kind in ("metrics", "params"):
                    record["items"] = [{k: getattr(i, k, None) for k in ("key", "value", "timestamp", "step")}
                                       for i in entry.payload]
                elif entry.kind in ("tags", "dict"):
                    record["items"] = entry.payload
                else:
                    record["spooled"] = str(entry.spooled)
                out.write(json.dumps(record) + "\n")
        return [e.describe() for e in entries]


def default_spool_root() -> Path:
    """The user's cache folder, not the temporary one: a job's temporary folder (and a local Ray
    worker's) goes with the job, and what the store did not take must outlive it."""
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "perceive_ir" / "spool"


def limit_client_retries(http_max_retries: int, http_timeout_s: int) -> None:
    """MLflow's HTTP client retries for minutes by default (7 tries, doubling pauses, 120 s timeout);
    the flusher retries by itself, so each try is kept short. Process-wide: MLflow reads these
    variables at every request."""
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(http_max_retries)
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(http_timeout_s)
