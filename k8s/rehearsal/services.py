"""The Deployments and the StatefulSet as local processes: each container's own command, arguments and
environment, its ports on loopback, and its readiness probe waited for."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

import requests

from rehearsal.manifests import Manifests, ServiceMap, container_of
from rehearsal.pods import Pod, PodSet, port_open, wait_until

__all__ = ["start_container", "start_postgres", "postgres_binaries"]


def _listen_locally(words: list[str], container_port: int, local: int) -> list[str]:
    """A server's listen options, as separate words or inside a shell line: its container port -> its
    loopback port, all interfaces -> loopback."""
    out = []
    for previous, word in zip([""] + words, words):
        if previous in ("--port", "-p") and word == str(container_port):
            word = str(local)
        elif previous in ("--host", "-H") and word == "0.0.0.0":
            word = "127.0.0.1"
        word = re.sub(rf"((?:--port|-p)[ =]){container_port}(?!\d)", rf"\g<1>{local}", word)
        out.append(re.sub(r"((?:--host|-H)[ =])0\.0\.0\.0", r"\g<1>127.0.0.1", word))
    return out


def _probe(pod: Pod, probe: dict, port_map: dict[int, int], env: dict[str, str], timeout_s: float) -> None:
    """Wait until the container's readiness probe passes, as the kubelet would before routing to it."""
    if "httpGet" in probe:
        port = port_map[int(probe["httpGet"]["port"])]
        url = f"http://127.0.0.1:{port}{probe['httpGet'].get('path', '/')}"

        def ready() -> bool:
            try:
                return requests.get(url, timeout=2).status_code < 400
            except requests.RequestException:
                return False
    elif "tcpSocket" in probe:
        port = port_map[int(probe["tcpSocket"]["port"])]

        def ready() -> bool:
            return port_open(port)
    else:
        command = probe["exec"]["command"]

        def ready() -> bool:
            return subprocess.run(command, env=env, capture_output=True).returncode == 0
    kind = next(k for k in ("httpGet", "tcpSocket", "exec") if k in probe)
    wait_until(ready, timeout_s, f"{pod.name} ready ({kind} probe)", pod)


def start_container(pods: PodSet, manifests: Manifests, services: ServiceMap, kind: str, name: str,
                    cwd: Path, timeout_s: float = 120.0) -> Pod:
    """A Deployment's container with its command and args (through the Service map), env resolved."""
    doc = manifests.get(kind, name)
    container = container_of(doc)
    env = {k: services.translate(v) for k, v in manifests.environment(container, f"{kind}/{name}").items()}
    port_map = {}
    words = [services.translate(w) for w in container.get("command", []) + container.get("args", [])]
    for port in container.get("ports", []):
        local = services.add(name, port["containerPort"])  # the Service's targetPort is the container's port
        port_map[port["containerPort"]] = local
        words = _listen_locally(words, port["containerPort"], local)
    pod = pods.start(name, words, env, cwd, group=f"{kind}/{name}")
    if "readinessProbe" in container:
        _probe(pod, container["readinessProbe"], port_map, {**os.environ, **env}, timeout_s)
    return pod


def postgres_binaries() -> Path:
    """PostgreSQL's bin folder: the ``pgserver`` wheel's, else the system's (Debian's postgresql)."""
    try:
        import pgserver

        found = Path(pgserver.__file__).parent / "pginstall" / "bin"
        if (found / "postgres").is_file():
            return found
    except ImportError:
        pass
    for candidate in [shutil.which("pg_ctl"), *sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), reverse=True)]:
        if candidate:
            return Path(candidate).resolve().parent
    raise RuntimeError("no PostgreSQL server found: pip install pgserver (or apt-get install postgresql)")


def _as_postgres_user() -> dict:
    """PostgreSQL refuses to run as root (as the postgres image does, it drops to an unprivileged user)."""
    return {"user": "nobody", "group": "nogroup"} if os.geteuid() == 0 else {}


def start_postgres(pods: PodSet, manifests: Manifests, services: ServiceMap, name: str, volumes: Path,
                   timeout_s: float = 60.0) -> Pod:
    """The StatefulSet's PostgreSQL: what the official image's entrypoint does with POSTGRES_USER,
    POSTGRES_PASSWORD, POSTGRES_DB and PGDATA (initdb, then the server and the database), the data
    directory on the volume claim's folder, listening on the Service's loopback port."""
    doc = manifests.get("StatefulSet", name)
    container = container_of(doc)
    env = manifests.environment(container, f"StatefulSet/{name}")
    mount = next(m for m in container["volumeMounts"])
    pgdata = volumes / f"{mount['name']}-{name}-0" / Path(env["PGDATA"]).relative_to(mount["mountPath"])
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    for folder in (volumes.parent, volumes):  # the server's user must reach its folder
        folder.chmod(0o755)
    bin_dir = postgres_binaries()
    user = _as_postgres_user()
    if user:
        shutil.chown(pgdata.parent, user["user"], user["group"])
    pwfile = Path(tempfile.mkstemp(dir=volumes)[1])
    pwfile.write_text(env["POSTGRES_PASSWORD"])
    if user:
        shutil.chown(pwfile, user["user"], user["group"])
    try:
        init = subprocess.run([str(bin_dir / "initdb"), "-D", str(pgdata), "-U", env["POSTGRES_USER"],
                               f"--pwfile={pwfile}", "--auth=scram-sha-256", "-E", "UTF8"],
                              capture_output=True, text=True, cwd=volumes, **user)
    finally:
        pwfile.unlink()
    if init.returncode != 0:
        raise RuntimeError(f"initdb for StatefulSet/{name} failed: {init.stderr.strip()[-2000:]}")
    container_port = container["ports"][0]["containerPort"]
    port = services.add(name, container_port)
    command = [str(bin_dir / "postgres"), "-D", str(pgdata), "-c", "listen_addresses=127.0.0.1", "-p", str(port),
               "-c", f"unix_socket_directories={pgdata.parent}"]
    if user:
        command = ["setpriv", f"--reuid={user['user']}", f"--regid={user['group']}", "--clear-groups", *command]
    pod = pods.start(name + "-0", command, {}, volumes, group=f"StatefulSet/{name}")
    probe_env = {**os.environ, "PGHOST": "127.0.0.1", "PGPORT": str(port), "PGPASSWORD": env["POSTGRES_PASSWORD"],
                 "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"}
    _probe(pod, {"exec": {"command": ["pg_isready", "-U", env["POSTGRES_USER"]]}}, {}, probe_env, timeout_s)
    subprocess.run([str(bin_dir / "psql"), "-U", env["POSTGRES_USER"], "-d", "postgres", "-v", "ON_ERROR_STOP=1",
                    "-c", f"CREATE DATABASE {shlex.quote(env['POSTGRES_DB'])}"], check=True, capture_output=True,
                   env=probe_env)
    _probe(pod, container["readinessProbe"], {}, probe_env, timeout_s)  # the manifest's own probe
    return pod


