"""The Kubernetes deployment rehearsed from its own manifests on this machine (``python k8s/rehearse.py``):
the rehearsal overlay rendered by kubectl's kustomize, PostgreSQL, the MLflow server with its manifest's
arguments, the in-cluster object store, a Ray head and three worker pods, every RayJob submitted as
KubeRay's submitter does, and a worker node's raylet killed during stage 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from conftest import REPO, shared_dataset

pytestmark = [pytest.mark.slow, pytest.mark.datasets]

STEPS = ["perceive-ir-shards", "perceive-ir-stage1", "perceive-ir-stage2", "perceive-ir-promote", "perceive-ir-tune"]


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    shared_dataset("CBSD68")
    report_path = tmp_path_factory.mktemp("rehearsal") / "report.json"
    run = subprocess.run([sys.executable, "k8s/rehearse.py", "--report", str(report_path)], cwd=REPO,
                         capture_output=True, text=True, timeout=1200)
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    print(run.stdout[-4000:])
    return run, report


def test_every_step_succeeds_and_ends_with_a_promoted_pair(rehearsal):
    run, report = rehearsal
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-6000:]
    statuses = {s["step"].removeprefix("RayJob "): s.get("status") for s in report["steps"]}
    assert all(statuses.get(name) == "SUCCEEDED" for name in STEPS), statuses
    checks = report["checks"]
    for model in ("perceive-ir-restorer", "perceive-ir-perceiver", "perceive-ir-medium-tier"):
        assert checks[f"{model}@champion"]["ok"], checks[f"{model}@champion"]  # its files in the artifacts bucket
    assert checks["stage-2 checkpoints in the runs bucket"]["ok"]
    # the tracking store is the StatefulSet's PostgreSQL, reached through the Service name
    assert "postgresql+psycopg2://mlflow:${DB_PASSWORD}@127.0.0.1:" in " ".join(report["mlflow_command"])


def test_training_workers_run_on_different_nodes_each_with_its_own_cache(rehearsal):
    _, report = rehearsal
    placement = report["node_loss"]["placement"]
    assert len(set(placement.values())) == 2 and all(n.startswith("perceive-ir-gpu-") for n in placement.values())
    caches = report["checks"]["stage-1 products fetched once into each node's own cache"]
    assert caches["ok"], caches
    # perceiver and medium tier: one entry each per node, the same two on every node (three pods: one replaced)
    assert len(caches["detail"]) == 3 and {len(set(e)) for e in caches["detail"].values()} == {2}


def test_a_lost_worker_node_is_replaced_and_stage_2_resumes_from_its_checkpoint(rehearsal):
    _, report = rehearsal
    loss = report["node_loss"]
    assert loss["lost"] in report["node_loss"]["placement"].values() and loss["replacement"]
    run = report["checks"]["stage-2 run resumed and finished"]
    assert run["ok"], run
    assert any(step > 0 for step in run["detail"]["resumed_from_step"])
    assert run["detail"]["last_logged_step"] == run["detail"]["max_steps"]
    # elastic: on at one worker while the node was away, back at two once it returned
    elastic = report["checks"]["stage-2 shrank at the node loss and grew back"]
    assert elastic["ok"], elastic
    assert loss["checkpoint_world_sizes"][-1] == 2  # the kept checkpoints (storage.keep_last): the newest at two


def test_nothing_is_left_behind(rehearsal):
    _, report = rehearsal
    assert report["leftover_processes"] == [] and report["leftover_files"] is False
    folder = report["folder"]
    assert not Path(folder).exists()
    running = [p.info["cmdline"] for p in psutil.process_iter(["cmdline"])
               if folder in " ".join(p.info["cmdline"] or [])]
    assert running == []
