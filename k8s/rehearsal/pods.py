"""Pods as local processes: each in a session of its own (so that it and everything it starts can be
stopped together), with a folder of its own for what a pod keeps to itself (its /tmp and its home)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import psutil

__all__ = ["Pod", "PodSet", "wait_until", "port_open", "python_bin", "POD_TMP"]

POD_TMP = "{pod_tmp}"  # in a command: the pod's own temporary folder


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str, pod: Optional["Pod"] = None) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if pod is not None and not pod.running():
            raise RuntimeError(f"{pod.name} exited (code {pod.process.returncode}) before {what}; "
                               f"its log: {pod.log}\n{pod.tail()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout_s:.0f} s" + (f"; log {pod.log}" if pod else ""))
        time.sleep(0.5)


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class Pod:
    name: str
    folder: Path  # the pod's own filesystem: tmp/, home/, log
    process: subprocess.Popen
    group: str = ""  # the workload it belongs to (a Ray worker group, a Deployment)

    @property
    def log(self) -> Path:
        return self.folder / "log"

    @property
    def tmp(self) -> Path:
        return self.folder / "tmp"

    def running(self) -> bool:
        return self.process.poll() is None

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def processes(self) -> list[psutil.Process]:
        """Every live process of the pod's session (what ``ray start`` daemonises included)."""
        found = []
        for proc in psutil.process_iter(["pid"]):
            try:
                if os.getsid(proc.pid) == self.process.pid:
                    found.append(proc)
            except (ProcessLookupError, PermissionError, psutil.Error):
                continue
        return found

    def stop(self, grace_s: float = 20.0) -> None:
        """What the kubelet does: SIGTERM to the pod's processes, SIGKILL after the grace period."""
        for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
            procs = self.processes()
            if not procs:
                break
            for proc in procs:
                try:
                    proc.send_signal(sig)
                except psutil.Error:
                    pass
            psutil.wait_procs(procs, timeout=wait)
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


@dataclass
class PodSet:
    """Every pod of the rehearsal, started in its root folder and stopped together."""

    root: Path
    base_env: dict[str, str]
    pods: list[Pod] = field(default_factory=list)
    _serial: int = 0

    def start(self, name: str, command: list[str], env: dict[str, str], cwd: Path, group: str = "") -> Pod:
        self._serial += 1
        folder = self.root / "p" / str(self._serial)  # short: Ray puts sockets under its /tmp
        (folder / "tmp").mkdir(parents=True)
        (folder / "home").mkdir()
        full_env = {**self.base_env, **env, "HOME": str(folder / "home"), "TMPDIR": str(folder / "tmp")}
        command = [word.replace(POD_TMP, str(folder / "tmp")) for word in command]
        with open(folder / "log", "wb") as log:
            process = subprocess.Popen(command, cwd=cwd, env=full_env, stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True)
        pod = Pod(name, folder, process, group)
        self.pods.append(pod)
        return pod

    def stop_all(self) -> None:
        """Every pod at once, as a namespace is deleted: each gets SIGTERM and its grace period."""
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=max(1, len(self.pods))) as pool:
            list(pool.map(Pod.stop, self.pods))

    def leftovers(self) -> list[str]:
        return [f"{pod.name}: pid {p.pid} {' '.join(p.cmdline()[:3])}" for pod in self.pods for p in pod.processes()
                if p.is_running()]


def python_bin() -> str:
    """The folder of this interpreter's scripts (ray, mlflow, moto_server, perceive-*): the image's PATH."""
    return str(Path(sys.executable).parent)
