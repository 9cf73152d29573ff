"""Rehearse the Kubernetes deployment on this machine, from its own manifests.

    python k8s/rehearse.py [--overlay k8s-overlays/rehearsal] [--secrets FILE] [--report FILE]

It renders the overlay with kubectl's kustomize (as ``kubectl apply -k`` would), then starts what
Kubernetes and KubeRay would start, as local processes on loopback, each "pod" with a /tmp and a home
of its own: the in-cluster object store (moto's S3 server), PostgreSQL with the StatefulSet's settings,
the MLflow server with exactly its manifest's arguments and environment (ConfigMap, and Secrets from
``--secrets``, a YAML file ``{secret: {key: value}}``; random ones when not given), a Ray head and the
worker pods of each group (``ray start`` as the operator builds it from rayStartParams). It creates the
buckets the manifests name, copies raw datasets into the raw bucket, and submits each RayJob of
k8s/jobs/ in order as KubeRay's submitter does. During stage 2 it kills the raylet of a node that runs a
training worker (SIGKILL) and starts the node again. It ends with the checks of the multi-node run,
each step's time, and everything it started stopped and its folder removed.

The substitutions, all for one machine: Service names resolve to the loopback ports of the processes
standing in for them (MLflow's Host-header check is tested on its own, tests/test_k8s.py); a pod's GPUs
are the custom resource ``rehearsal_gpu``; the image is this checkout (the files the Dockerfile copies)
with this Python environment and its compiled torch extensions. Exit code 0 when every step succeeded
and every check held.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import yaml  # noqa: E402

from rehearsal.checks import check_run  # noqa: E402
from rehearsal.faults import NodeLoss  # noqa: E402
from rehearsal.manifests import Manifests, ServiceMap, render  # noqa: E402
from rehearsal.pods import PodSet, python_bin  # noqa: E402
from rehearsal.ray_nodes import RayCluster  # noqa: E402
from rehearsal.services import start_container, start_postgres  # noqa: E402
from rehearsal.storage import (  # noqa: E402
    bucket_names, checkpoint_world_sizes, complete_checkpoints, s3_client, upload_folder)
from rehearsal.submitter import run_rayjob  # noqa: E402

CLUSTER = "perceive-ir"
STAGE2_JOB = "perceive-ir-stage2"
RUNS_BUCKET = "perceive-ir-runs"
# The user's raw data, copied to the raw bucket before the first step: (folder under --datasets, URL, count)
RAW_DATA = [("CBSD68", "s3://perceive-ir-raw/CBSD68", 8),
            ("CBSD68", "s3://perceive-ir-raw/benchmarks/CBSD68", 4),
            ("Rain100L_subset3", "s3://perceive-ir-raw/benchmarks/Rain100L_subset3", None)]


def build_image(root: Path) -> Path:
    """The image's working folder: what k8s/Dockerfile copies, under its WORKDIR."""
    image = root / "image"
    for line in (HERE / "Dockerfile").read_text().splitlines():
        words = line.split()
        if words[:1] == ["COPY"]:
            *sources, dest = [w for w in words[1:] if not w.startswith("--")]
            for source in sources:
                target = image / dest / Path(source).name if dest.endswith("/") else image / dest
                if (REPO / source).is_dir():
                    shutil.copytree(REPO / source, target, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
                else:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(REPO / source, target)
    return image


def job_order(manifests: Manifests) -> list[dict]:
    """The RayJobs in the order of k8s/jobs/Kustomization (the order they are applied in)."""
    order = yaml.safe_load((HERE / "jobs" / "Kustomization").read_text())["resources"]
    names = [yaml.safe_load((HERE / "jobs" / f).read_text())["metadata"]["name"] for f in order]
    return [manifests.get("RayJob", name) for name in names]


def generated_secrets() -> dict[str, dict[str, str]]:
    return {"perceive-ir-s3": {"access_key_id": "rehearsal-" + secrets.token_hex(4),
                               "secret_access_key": secrets.token_hex(16)},
            "mlflow-db": {"password": secrets.token_hex(16)}}


def rehearse(args: argparse.Namespace, root: Path, pods: PodSet, report: dict) -> None:
    def step(name: str, started: float) -> None:
        report["steps"].append({"step": name, "seconds": round(time.perf_counter() - started, 1)})
        print(f"[rehearsal] {name}: {report['steps'][-1]['seconds']} s", flush=True)

    t = time.perf_counter()
    docs = render(args.overlay)
    manifests = Manifests(docs, yaml.safe_load(args.secrets.read_text()) if args.secrets else generated_secrets())
    namespace = manifests.all("Namespace")[0]["metadata"]["name"]
    services = ServiceMap(namespace)
    image = build_image(root)
    step("render the overlay, build the image folder", t)

    t = time.perf_counter()
    start_container(pods, manifests, services, "Deployment", "s3", root)
    start_postgres(pods, manifests, services, "mlflow-db", root / "volumes")
    mlflow = start_container(pods, manifests, services, "Deployment", "mlflow", root)
    report["mlflow_command"] = mlflow.process.args  # the manifest's, Secrets unexpanded (the shell expands them)
    step("object store, PostgreSQL, MLflow server", t)

    t = time.perf_counter()
    credentials = manifests.secrets["perceive-ir-s3"]
    s3_endpoint = f"http://127.0.0.1:{services.local('s3', 9000)}"
    s3 = s3_client(s3_endpoint, credentials["access_key_id"], credentials["secret_access_key"])
    for bucket in bucket_names(docs):
        s3.create_bucket(Bucket=bucket)
    for folder, url, limit in RAW_DATA:
        if upload_folder(s3, args.datasets / folder, url, limit) == 0:
            raise FileNotFoundError(f"no images in {args.datasets / folder} (--datasets)")
    cluster = RayCluster(manifests, services, CLUSTER, pods, image)
    cluster.start()
    report["nodes"] = [pod.name for pod in cluster.nodes]
    step(f"buckets, raw data, Ray cluster of {len(cluster.nodes)} nodes", t)

    head_env = manifests.environment(cluster.groups[0].container, "RayCluster/head")
    submitter_env = {k: services.translate(v) for k, v in head_env.items()}
    # Two complete checkpoints: the first is then reported to Ray Train, which resumes from reported ones only.
    loss = NodeLoss(cluster, lambda: complete_checkpoints(s3, RUNS_BUCKET, f"ray/{STAGE2_JOB}/", ranks=2) >= 2,
                    lambda: 1 in checkpoint_world_sizes(s3, RUNS_BUCKET, f"ray/{STAGE2_JOB}/"))
    for rayjob in job_order(manifests):
        name = rayjob["metadata"]["name"]
        run = run_rayjob(pods, services, rayjob, CLUSTER, image, submitter_env, args.job_timeout,
                         while_running=loss if name == STAGE2_JOB else None)
        report["steps"].append({"step": f"RayJob {name}", "seconds": round(run.seconds, 1), "status": run.status})
        print(f"[rehearsal] RayJob {name}: {run.status} in {run.seconds:.1f} s (log {run.log})", flush=True)
        if run.status != "SUCCEEDED":
            print(run.log.read_text(errors="replace")[-6000:], file=sys.stderr)
            raise RuntimeError(f"RayJob {name} ended {run.status}")
    report["node_loss"] = {"placement": loss.placement, "lost": loss.lost, "replacement": loss.replacement,
                           "seconds_to_shrink": round(loss.seconds_to_shrink, 1),
                           "seconds_to_replace": round(loss.seconds_to_replace, 1),
                           "seconds_to_grow": round(loss.seconds_to_grow, 1),
                           "checkpoint_world_sizes": checkpoint_world_sizes(s3, RUNS_BUCKET, f"ray/{STAGE2_JOB}/")}
    t = time.perf_counter()
    mlflow_uri = f"http://127.0.0.1:{services.local('mlflow', 5000)}"
    report["checks"] = check_run(cluster, s3, mlflow_uri, STAGE2_JOB, RUNS_BUCKET, loss)
    step("checks", t)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--overlay", type=Path, default=REPO / "k8s-overlays" / "rehearsal")
    parser.add_argument("--secrets", type=Path, help="YAML {secret name: {key: value}}; default: random values")
    parser.add_argument("--datasets", type=Path, default=REPO.parent / "shared" / "datasets",
                        help="raw images copied to the raw bucket (CBSD68/, Rain100L_subset3/)")
    parser.add_argument("--report", type=Path, help="write the steps, times and checks here as JSON")
    parser.add_argument("--keep-logs", action="store_true", help="keep the pods' folders (logs) after a failure")
    parser.add_argument("--job-timeout", type=float, default=600.0, help="seconds each RayJob may take")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="pir-"))  # short: Ray keeps sockets under each pod's /tmp in it
    env = {"PATH": f"{python_bin()}:/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HF_HUB_OFFLINE": "1",
           "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1",
           # the image's compiled extensions (DeepSpeed's CPU ops): this machine's cache, built once, shared
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR")
           or str(Path.home() / ".cache" / "torch_extensions")}
    pods = PodSet(root, env)
    report: dict = {"steps": [], "ok": False, "leftover_files": False, "folder": str(root)}
    try:
        rehearse(args, root, pods, report)
        report["ok"] = all(check["ok"] for check in report["checks"].values())
    except Exception as err:  # noqa: BLE001 - reported, then everything is stopped
        report["error"] = f"{type(err).__name__}: {err}"
        print(f"[rehearsal] failed: {report['error']}", file=sys.stderr)
    finally:
        t = time.perf_counter()
        pods.stop_all()
        report["leftover_processes"] = pods.leftovers()
        if args.keep_logs and not report["ok"]:
            print(f"[rehearsal] the pods' folders and logs are kept in {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
            report["leftover_files"] = root.exists()
        report["steps"].append({"step": "stop everything", "seconds": round(time.perf_counter() - t, 1)})
        report["seconds"] = round(time.perf_counter() - started, 1)
    ok = report["ok"] and not report["leftover_processes"] and not report["leftover_files"]
    print(json.dumps({k: v for k, v in report.items() if k != "steps"}, indent=1, default=str))
    for entry in report["steps"]:
        print(f"  {entry['step']:<62} {entry['seconds']:>7.1f} s  {entry.get('status', '')}")
    print(f"[rehearsal] {'passed' if ok else 'FAILED'} in {report['seconds']:.0f} s")
    if args.report:
        args.report.write_text(json.dumps(report, indent=1, default=str))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
