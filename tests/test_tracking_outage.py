"""A tracking outage in the middle of a run, all real: an ``mlflow server`` process on loopback that
the test stops and starts again on the same port, and a stage-1 job on Ray (1 worker, DeepSpeed)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from _mlflow_server import MlflowServer
from _train_fixtures import build_tiny_shards
from conftest import REPO
from perceive_ir.config import load_config
from perceive_ir.orchestration.config import Stage1Config
from perceive_ir.tracking import RunTracker, TrackingConfig, find_or_create_run
from perceive_ir.tracking.buffer import DROPPED_METRIC, TrackingNotDrained

pytestmark = pytest.mark.slow

OUTAGE_S = 20  # MLflow's own client would retry for about 4 minutes (7 tries, doubling pauses)
STEPS = 80  # long enough that the outage falls inside training on a quiet machine too


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    server.start()
    yield server
    server.stop()


def _checkpoint_steps(storage: Path) -> set[int]:
    return {json.loads(p.read_text())["step"] for p in storage.glob("*/checkpoint_*/index_rank0.json")}


def test_training_runs_through_an_outage_and_every_point_reaches_the_store(server, package_photos, tmp_path,
                                                                           monkeypatch):
    import ray
    from mlflow.tracking import MlflowClient

    from perceive_ir.orchestration.trainer import launch

    monkeypatch.chdir(REPO)
    shards = build_tiny_shards(package_photos, str(tmp_path / "shards"))
    storage = tmp_path / "ray"
    cfg = load_config(Stage1Config, REPO / "configs/stage1_tiny.yaml", [
        "name=outage", f"data.train.sources=[{{location: {shards}}}]", f"tracking.uri={server.uri}",
        "tracking.experiment=outage", "tracking.retry_max_interval_s=2", f"storage.path={storage}",
        "storage.keep_last=100", f"restorer_steps={STEPS // 2}", f"prompt_steps={STEPS // 2}",
        "loop.log_every=1", "loop.checkpoint_every=4", f"loop.val_every={STEPS}", "ray.num_workers=1",
        "ray.health_check_interval_s=0.1", "data.train.patch_size=32", "data.train.samples_per_epoch=16",
        "data.validation.images=2", "data.validation.types=[haze]", "data.validation.patch_size=32",
    ])
    client = MlflowClient(tracking_uri=server.uri)
    seen: dict[str, object] = {}

    def outage() -> None:
        """Stop the server once step 2 is in the store, keep it away OUTAGE_S seconds, start it again;
        meanwhile log to a second run with a small buffer and a short drain limit."""
        try:
            while "run_id" not in seen:
                runs = client.search_runs([client.get_experiment_by_name("outage").experiment_id]) \
                    if client.get_experiment_by_name("outage") else []
                if runs:
                    seen["run_id"] = runs[0].info.run_id
                time.sleep(0.2)
            while len(client.get_metric_history(seen["run_id"], "train/total")) < 2:
                time.sleep(0.2)
            _, side_run, _ = find_or_create_run(TrackingConfig(uri=server.uri, experiment="outage-side"), "side",
                                                {}, {}, "test")
            server.stop()
            seen["stopped_at"] = _checkpoint_steps(storage)
            stopped = time.monotonic()
            settings = TrackingConfig(buffer_max_metric_points=5, drain_timeout_s=1, retry_max_interval_s=1,
                                      spool_dir=str(tmp_path / "spool"))
            small = RunTracker(server.uri, side_run, settings, background=True)
            for step in range(12):
                small.log_metrics({"side/x": float(step)}, step=step)
            (tmp_path / "note.txt").write_text("spooled while the store was away")
            small.log_file(tmp_path / "note.txt", "notes")
            late = RunTracker(server.uri, side_run, settings, background=True)
            late.log_metrics({"side/late": 1.0}, step=0)
            try:
                late.close()
            except TrackingNotDrained as err:
                seen["not_drained"] = str(err)
            time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - stopped)))
            seen["restarted_at"] = _checkpoint_steps(storage)
            server.start()
            small.close(timeout_s=120)
            seen["side_run"] = side_run
        except BaseException as err:  # noqa: BLE001 - reported by the test
            seen["error"] = err

    watcher = threading.Thread(target=outage, daemon=True)
    watcher.start()
    try:
        result = launch("stage1", cfg, working_dir=REPO)
    finally:
        ray.shutdown()
    watcher.join(timeout=300)
    assert "error" not in seen, seen.get("error")
    assert "restarted_at" in seen, "the outage did not happen during the run"
    # training went on while the store was away: checkpoints of later steps were written meanwhile
    assert max(seen["restarted_at"]) > max(seen["stopped_at"] | {0}), seen
    history = client.get_metric_history(result.run_id, "train/total")
    assert {m.step for m in history} == set(range(1, STEPS + 1))  # before, during and after the outage
    assert {m.step for m in client.get_metric_history(result.run_id, "lr/restorers")} == set(range(1, STEPS + 1))
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED" and DROPPED_METRIC not in run.data.metrics
    assert {a.path for a in client.list_artifacts(result.run_id, "perceiver")} >= {"perceiver/perceiver.json"}

    # the small buffer kept the 5 newest points, counted the 7 it dropped, and uploaded the spooled file
    side = seen["side_run"]
    assert [(m.step, m.value) for m in sorted(client.get_metric_history(side, "side/x"), key=lambda m: m.step)] \
        == [(s, float(s)) for s in range(7, 12)]
    assert client.get_run(side).data.metrics[DROPPED_METRIC] == 7.0
    assert client.get_run(side).data.tags[DROPPED_METRIC] == "7"
    assert [a.path for a in client.list_artifacts(side, "notes")] == ["notes/note.txt"]
    # a drain limit that passed names what was not written and where it was saved
    message = seen["not_drained"]
    assert "1 metric points at step 0" in message and "tracking.drain_timeout_s" in message
    saved = Path(message.rsplit("Saved under ", 1)[1])
    assert json.loads((saved / "pending.jsonl").read_text().splitlines()[0])["items"][0]["key"] == "side/late"


def test_a_call_that_needs_the_store_waits_for_it_and_then_says_which_setting_ran_out(server, monkeypatch):
    """What a search's driver does after its trials, and a restarted trial at its start (search/runner.py,
    search/trainable.py): the store stopped, a call waits until it is back; a wait too short fails with
    the store and the setting named."""
    from mlflow.tracking import MlflowClient

    from perceive_ir.tracking.mlflow_run import when_store_answers

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # one short try per call, as in a trial
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    client = MlflowClient(tracking_uri=server.uri)
    experiment = client.create_experiment("store-wait")
    server.stop()
    back = threading.Timer(4.0, server.start)
    back.start()
    try:
        found = when_store_answers(lambda: client.get_experiment(experiment), server.uri, 120, "a search",
                                   "trial_store_wait_s")
        assert found.name == "store-wait"
    finally:
        back.join()
    server.stop()
    try:
        with pytest.raises(ConnectionError, match=r"a search: MLflow tracking store 'http://127\.0\.0\.1:\d+' did "
                                                  r"not answer within trial_store_wait_s=2 s"):
            when_store_answers(lambda: client.get_experiment(experiment), server.uri, 2, "a search",
                               "trial_store_wait_s")
    finally:
        server.start()
