"""Ray Tune searches, all real: trials are stage-2 Ray Train + DeepSpeed runs (1 CPU worker each, two at
a time), MLflow on SQLite, checkpoints on moto's S3 server on loopback.

One search of four trials whose learning rates differ by orders of magnitude (so ASHA has trials to
stop) is killed (SIGKILL) mid-search, once a trial has ended and the next one runs, and launched
again; the relaunch finishes it without training the trials that had ended. A bad search space
fails before Ray starts.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from _train_fixtures import build_tiny_shards
from conftest import REPO
from perceive_ir.config import ConfigError
from perceive_ir.search import plan_search
from perceive_ir.search.runner import LOST_TRIALS_TAG, TrialResources, asha_max_t, concurrent_trials
from perceive_ir.search.space import parse_space

SEARCH = "tune-test"
EXPERIMENT = "tune-test"
LEARNING_RATES = [3.0e-3, 1.0e-3, 1.0, 0.5]  # grid order: the two good ones start first
MAX_STEPS = 6


@pytest.fixture(scope="module")
def perceiver(tmp_path_factory) -> Path:
    """A stage-1 perceiver product (tiny random CLIP, untrained prompts)."""
    from perceive_ir.config import from_dict
    from perceive_ir.models import PerceiverConfig
    from perceive_ir.products import ensure_clip_weights, save_perceiver

    root = tmp_path_factory.mktemp("perceiver")
    raw = yaml.safe_load((REPO / "configs/models/perceiver_tiny.yaml").read_text())
    raw["arch_config"] = str(REPO / raw["arch_config"])
    cfg = ensure_clip_weights(from_dict(PerceiverConfig, raw), seed=0, cache=root / "clip")
    return save_perceiver(cfg.build(), cfg, root / "perceiver")


def write_search(folder: Path, shards: str, perceiver: Path, storage: dict, **extra) -> Path:
    search = {
        "name": SEARCH, "base": "configs/stage2_tiny.yaml",
        "stage2": {
            "perceiver": str(perceiver),
            "data": {"train": {"sources": [{"location": shards}], "samples_per_epoch": 24, "patch_size": 32},
                     "validation": {"images": 2, "patch_size": 32, "types": ["gaussian_noise", "haze"]}},
            "loop": {"max_steps": MAX_STEPS, "val_every": 2, "log_every": 2},
            "optimizer": {"warmup_steps": 0},
            "ray": {"num_workers": 1, "health_check_interval_s": 0.1},
            "storage": storage,
            "tracking": {"uri": f"sqlite:///{folder / 'mlflow.db'}", "experiment": EXPERIMENT},
        },
        "space": {"optimizer.lr": {"grid": LEARNING_RATES}, "loss.l3": {"quniform": [0.05, 0.2, 0.05]}},
        "num_trials": 1, "concurrency": 2,
        "scheduler": {"name": "asha", "grace_period": 2, "reduction_factor": 4},  # one rung, at step 2
        "state_save_period_s": 1, "register_as": "tune-test",
        **extra,
    }
    path = folder / "search.yaml"
    path.write_text(yaml.safe_dump(search, sort_keys=False))
    return path


def nested_runs(client, parent_run_id: str):
    experiment = client.get_experiment_by_name(EXPERIMENT)
    return client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_run_id}'")


def parent_run(client):
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        return None
    runs = client.search_runs([experiment.experiment_id], f"tags.`perceive_ir.run_name` = '{SEARCH}'")
    return runs[0] if runs else None


def start_search(config: Path, log: Path) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.Popen([sys.executable, "jobs/tune.py", "--config", str(config)], cwd=REPO, env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def quiet_moment(runs, now_ms: int) -> bool:
    """A trial has ended, its replacement runs next to another trial, and no trial ended in the last
    10 s: Tune has created the trials it will create for now and stored its state (every second), so a
    kill here tests recovery, not Tune's own race between writing its trial list and its searcher."""
    ended = [r.info.end_time for r in runs if r.info.status in ("FINISHED", "KILLED")]
    running = [r for r in runs if r.info.status == "RUNNING"]
    return bool(ended) and len(running) == 2 and now_ms - max(ended) > 10_000 \
        and all(now_ms - r.info.start_time > 2_000 for r in running)


@pytest.fixture(scope="module")
def killed_and_relaunched(package_photos, perceiver, s3_module_bucket, tmp_path_factory):
    """The search, killed with SIGKILL once a trial has ended (finished or stopped early) and the
    next one runs, then launched again."""
    from mlflow.tracking import MlflowClient

    bucket, options = s3_module_bucket
    root = tmp_path_factory.mktemp("tune")
    shards = build_tiny_shards(package_photos, str(root / "shards"))
    storage = {"path": f"{bucket}/ray", "endpoint_url": options["endpoint_url"], "keep_last": 2}
    config = write_search(root, shards, perceiver, storage)
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    first = start_search(config, root / "first.log")
    ended_at_kill: dict[str, str] = {}
    validated_at_kill: set[str] = set()
    try:
        deadline = time.time() + 600  # give up (and fail) if no such moment comes by then
        while time.time() < deadline and first.poll() is None:
            parent = parent_run(client)
            runs = nested_runs(client, parent.info.run_id) if parent else []
            if quiet_moment(runs, int(time.time() * 1000)):
                os.killpg(first.pid, signal.SIGKILL)  # the driver and the local Ray it started
                ended_at_kill = {r.info.run_id: r.info.status for r in runs if r.info.status in ("FINISHED", "KILLED")}
                validated_at_kill = {r.info.run_id for r in runs if "val/mean/psnr_out" in r.data.metrics}
                break
            time.sleep(1)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert ended_at_kill, (root / "first.log").read_text()[-4000:]
    time.sleep(2)  # let the killed processes' sockets close before a new local Ray starts
    second = start_search(config, root / "second.log")
    assert second.wait(timeout=600) == 0, (root / "second.log").read_text()[-4000:]
    return {"client": client, "ended_at_kill": ended_at_kill, "validated_at_kill": validated_at_kill,
            "bucket": bucket, "options": options, "output": (root / "second.log").read_text()}


def test_search_with_asha_nested_runs_and_the_best_registered(killed_and_relaunched):
    client = killed_and_relaunched["client"]
    parent = parent_run(client)
    assert parent.info.status == "FINISHED" and parent.data.tags["launches"] == "2"
    assert LOST_TRIALS_TAG not in parent.data.tags
    runs = nested_runs(client, parent.info.run_id)
    # one nested run per trial, none started twice as a new run
    assert len(runs) == len(LEARNING_RATES), [(r.data.tags.get("search.trial_id"), r.info.status) for r in runs]
    assert sorted(float(r.data.params["search/optimizer.lr"]) for r in runs) == sorted(LEARNING_RATES)
    assert all(r.data.params["optimizer.lr"] == r.data.params["search/optimizer.lr"] for r in runs)
    stopped = [r for r in runs if r.data.tags.get("search.early_stopped") == "true"]
    finished = [r for r in runs if r.info.status == "FINISHED"]
    assert stopped and finished and len(stopped) + len(finished) == len(runs)
    assert all(r.info.status == "KILLED" for r in stopped)
    for run in stopped:  # stopped at ASHA's rung (step 2); how far it ran on before it ended is not asserted
        assert not client.search_model_versions(f"run_id = '{run.info.run_id}'")
    for run in finished:
        steps = {m.step for m in client.get_metric_history(run.info.run_id, "val/mean/psnr_out")}
        assert steps == set(range(2, MAX_STEPS + 1, 2))  # a resumed run may validate a step twice
    best_tag = parent.data.tags["search.best_registered"]
    best = max(finished, key=lambda r: r.data.metrics["val/mean/psnr_out"])
    assert best_tag.startswith(best.info.run_id + " ")
    assert parent.data.tags["search.best_trial"] == best.data.tags["search.trial_id"]
    (version,) = client.search_model_versions("name = 'tune-test-restorer'")
    assert version.run_id == best.info.run_id
    assert version.tags["search.parent_run_id"] == parent.info.run_id == version.tags["lineage.search_run"]
    assert float(version.tags["search.value.optimizer.lr"]) == float(best.data.params["optimizer.lr"])
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "search")}
    assert {"search/results.csv", "search/results.md", "search/search_plot.png"} <= artifacts
    table = Path(client.download_artifacts(parent.info.run_id, "search/results.csv")).read_text().splitlines()
    assert table[0].startswith("trial,optimizer.lr,loss.l3,objective") and len(table) == 1 + len(LEARNING_RATES)
    assert "early-stopped" in "\n".join(table)


def test_relaunch_after_kill_does_not_train_ended_trials_again(killed_and_relaunched):
    client = killed_and_relaunched["client"]
    runs = {r.info.run_id: r for r in nested_runs(client, parent_run(client).info.run_id)}
    for run_id in killed_and_relaunched["ended_at_kill"]:
        assert runs[run_id].data.tags["launches"] == "1", run_id  # not launched again
    for run_id, run in runs.items():  # runs interrupted after a validation resumed from its checkpoint
        if run_id in killed_and_relaunched["validated_at_kill"] and run_id not in killed_and_relaunched["ended_at_kill"] \
                and run.data.tags["launches"] == "2":
            resumed = [m.value for m in client.get_metric_history(run_id, "resumed_from_step")]
            assert resumed and resumed[0] >= 2


def test_trial_checkpoints_live_under_the_storage_path(killed_and_relaunched):
    from perceive_ir.data.storage import filesystem
    from perceive_ir.tracking import RUN_NAME_TAG

    client = killed_and_relaunched["client"]
    fs, path = filesystem(f"{killed_and_relaunched['bucket']}/ray/{SEARCH}", killed_and_relaunched["options"])
    listed = sorted(Path(name).name for name in fs.ls(f"{path}/train"))
    trial_names = {r.data.tags[RUN_NAME_TAG] for r in nested_runs(client, parent_run(client).info.run_id)}
    assert len(trial_names) == len(LEARNING_RATES) and trial_names <= set(listed), listed
    for name in trial_names:  # every trial's run stored its checkpoints there
        assert any("checkpoint_" in found for found in fs.find(f"{path}/train/{name}", withdirs=True)), name
    assert any(Path(name).name.startswith("experiment_state") for name in fs.ls(path))  # Tune's state, for restore


def test_a_bad_search_space_fails_before_ray_starts(tmp_path, perceiver):
    import ray

    storage = {"path": str(tmp_path / "ray")}
    cases = [
        ({"loss.l9": {"uniform": [0.0, 1.0]}}, "search space 'loss.l9'.*value 0.0: unknown key 'loss.l9' in LossConfig"),
        ({"loss.l1": {"gaussian": [0.0, 1.0]}}, "search space 'loss.l1': unknown distribution 'gaussian'"),
        ({"loss.l1": {"loguniform": [0.0, 1.0]}}, "search space 'loss.l1': 'loguniform' needs low > 0"),
        ({"loss.perceptual.params.tier_thresholds.0": {"uniform": [0.1, 0.9]}},
         "search space 'loss.perceptual.params.tier_thresholds.0'.*with value 0.9.*must be increasing"),
        ({"loss.perceptual.params.tier_thresholds.5": {"uniform": [0.1, 0.2]}}, "'loss.perceptual.params.tier_thresholds' has 2 items"),
    ]
    for space, message in cases:
        config = write_search(tmp_path, "shards", perceiver, storage)
        raw = yaml.safe_load(config.read_text())
        raw["space"] = space
        raw["stage2"]["loss"] = {"perceptual": {"params": {"tier_thresholds": [0.3, 0.6], "tier_weights": [1, 1, 1],
                                                           "vgg": {"pretrained": False}}}}
        config.write_text(yaml.safe_dump(raw))
        with pytest.raises(ConfigError, match=message):
            plan_search(config)
    out = subprocess.run([sys.executable, "jobs/tune.py", "--config", str(config)], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and "search space 'loss.perceptual.params.tier_thresholds.5'" in out.stderr
    assert "Started a local Ray instance" not in out.stdout + out.stderr
    assert not ray.is_initialized()


def test_trials_at_once_never_exceed_what_the_cluster_holds():
    one_worker, two_workers = TrialResources({"CPU": 1}, 2**28), TrialResources({"CPU": 2}, 2**28)
    assert concurrent_trials(2, 4, one_worker, {"CPU": 2.0}) == 2
    assert concurrent_trials(2, 4, two_workers, {"CPU": 2.0}) == 1
    assert concurrent_trials(8, 3, one_worker, {"CPU": 16.0}) == 3
    four_gpus = TrialResources({"CPU": 4, "GPU": 4}, 2**28)
    assert concurrent_trials(4, 8, four_gpus, {"CPU": 64.0, "GPU": 8.0}) == 2
    with pytest.raises(ConfigError, match="one trial needs 2 CPU"):
        concurrent_trials(1, 1, two_workers, {"CPU": 1.0})
    # an autoscaling cluster with no GPU node up yet: sized to what it can grow to, not refused
    assert concurrent_trials(4, 32, four_gpus, {"CPU": 4.0}, {"CPU": 132.0, "GPU": 16.0}) == 4
    with pytest.raises(ConfigError, match="one trial needs 4 CPU, 4 GPU"):
        concurrent_trials(4, 32, four_gpus, {"CPU": 4.0})
    # custom resources count too: one worker per node that offers one slot
    slots = TrialResources({"CPU": 1, "rehearsal_gpu": 1}, 2**28)
    assert concurrent_trials(4, 4, slots, {"CPU": 24.0, "rehearsal_gpu": 2.0}) == 2
    assert one_worker.driver_bundle() == {"CPU": 0, "memory": float(2**28)}
    on_stable_nodes = TrialResources({"CPU": 1}, 2**28, {"stable_node": 0.01})
    assert on_stable_nodes.driver_bundle() == {"CPU": 0, "memory": float(2**28), "stable_node": 0.01}
    assert asha_max_t(6, 2, 2) == 4 and asha_max_t(7, 2, 2) == 6
    with pytest.raises(ConfigError, match="grace_period 6"):
        asha_max_t(6, 2, 6)


def test_distributions_parse_and_quantised_bounds_round_to_the_step():
    (q,) = parse_space({"loss.l2": {"quniform": [0.01, 0.2, 0.05]}}, "x.yaml")
    assert q.probe_values() == pytest.approx([0.05, 0.2])
    (g,) = parse_space({"loss.l2": {"grid": [0.0, 0.1]}}, "x.yaml")
    assert g.tune_domain() == {"grid_search": [0.0, 0.1]}
    (lg,) = parse_space({"optimizer.lr": {"loguniform": [1e-4, 1e-2]}}, "x.yaml")
    assert lg.is_log and 1e-4 <= lg.tune_domain().sample() <= 1e-2
    with pytest.raises(ConfigError, match="'quniform' needs \\[low, high, step\\]"):
        parse_space({"loss.l2": {"quniform": [0.0, 1.0]}}, "x.yaml")
    with pytest.raises(ConfigError, match="'space' is empty"):
        parse_space({}, "x.yaml")


def test_the_best_trial_is_registered_with_the_search_as_its_lineage(tmp_path, perceiver):
    """Without Ray: a finished trial run holding a restorer, registered as the search's best."""
    from mlflow.tracking import MlflowClient

    from _model_fixtures import TINY_NAFNET
    from perceive_ir.models import RestorerConfig
    from perceive_ir.search.report import TrialRecord
    from perceive_ir.config import to_dict
    from perceive_ir.registry.lineage import config_hash
    from perceive_ir.search.tracking import open_parent_run, register_best
    from perceive_ir.tracking import RunTracker, TrackingConfig, find_or_create_run, version_tags
    from perceive_ir.products import save_restorer

    config = write_search(tmp_path, str(tmp_path / "shards"), perceiver, {"path": str(tmp_path / "ray")})
    plan = plan_search(config)
    uri, parent_id, _ = open_parent_run(plan)
    cfg = RestorerConfig(backbone={"name": "nafnet", "params": TINY_NAFNET}, conditioning={"name": "none"})
    restorer = save_restorer(cfg.build(), cfg, tmp_path / "restorer")
    _, trial_id, _ = find_or_create_run(TrackingConfig(uri=uri, experiment=EXPERIMENT), f"{SEARCH}-t1", {},
                                        version_tags(), "stage2")
    RunTracker(uri, trial_id).log_folder(restorer, "restorer")
    # the trial trained with its own storage folder, which a config rebuilt from the plan would not know
    trained = plan.trial_config({"optimizer.lr": 1e-3}, f"{SEARCH}-t1", str(tmp_path / "ray" / "t1"))
    (tmp_path / "stage2_resolved.yaml").write_text(yaml.safe_dump(to_dict(trained), sort_keys=False))
    RunTracker(uri, trial_id).log_file(tmp_path / "stage2_resolved.yaml", "config")
    record = TrialRecord("t1", trial_id, "completed", {"optimizer.lr": 1e-3}, curve=[(2, 20.0)])
    (registered,) = register_best(RunTracker(uri, parent_id), plan, [record]).values()
    name, number = registered[len("models:/"):].rsplit("/", 1)
    tags = MlflowClient(tracking_uri=uri).get_model_version(name, number).tags
    assert tags["lineage.search_run"] == tags["search.parent_run_id"] == parent_id
    assert tags["lineage.run_id"] == trial_id
    rebuilt = plan.trial_config({"optimizer.lr": 1e-3}, f"{SEARCH}-t1", plan.base.storage.path)
    assert tags["lineage.config_sha256"] == config_hash(to_dict(trained)) != config_hash(to_dict(rebuilt))


def test_an_early_stop_mark_the_store_cannot_take_is_written_once_it_answers(tmp_path, monkeypatch):
    """Without Ray: the search's callback keeps a mark it could not write and writes it at a later result
    (a stopped trial left unmarked would be trained again by a relaunch)."""
    from types import SimpleNamespace

    from mlflow.tracking import MlflowClient

    from perceive_ir.search.tracking import SEARCH_TAGS, EarlyStopMarker, trial_run_name
    from perceive_ir.tracking import TrackingConfig, find_or_create_run

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _, run_id, _ = find_or_create_run(TrackingConfig(uri=uri, experiment=EXPERIMENT), trial_run_name(SEARCH, "t1"),
                                      {}, {}, "stage2")
    marker = EarlyStopMarker("http://127.0.0.1:9", EXPERIMENT, SEARCH, retry_every_s=0, final_wait_s=0)
    marker.on_trial_complete(0, [], SimpleNamespace(trial_id="t1"))  # the store does not answer
    assert marker.pending == ["t1"]
    marker.tracking_uri = uri  # it answers again
    marker.on_trial_result(1, [], SimpleNamespace(trial_id="t2"), {})
    run = MlflowClient(tracking_uri=uri).get_run(run_id)
    assert marker.pending == [] and run.info.status == "KILLED"
    assert run.data.tags[SEARCH_TAGS["early_stopped"]] == "true"


def test_asha_of_a_relaunched_search_takes_in_the_trials_it_restores():
    """Tune restores trials but not its scheduler: two ended trials of the first launch must still set the
    rung's bar for a bad new trial (plain ASHA would let it through, being the first it sees there)."""
    from types import SimpleNamespace

    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    from perceive_ir.search.runner import RestorableASHA

    def scheduler(cls):
        return cls(time_attr="step", metric="objective", mode="max", max_t=4, grace_period=2, reduction_factor=4,
                   stop_last_trials=False)

    ended = [SimpleNamespace(trial_id=f"t{i}", status="TERMINATED", last_result={"step": 6, "objective": value})
             for i, value in enumerate([13.7, 13.9])]
    running = SimpleNamespace(trial_id="t2", status="PENDING", last_result={"step": 2, "objective": 13.8})
    bad = SimpleNamespace(trial_id="t3", status="PENDING", last_result={})
    actions = {}
    for cls in (ASHAScheduler, RestorableASHA):
        asha = scheduler(cls)
        for trial in [*ended, running, bad]:
            asha.on_trial_add(None, trial)
        actions[cls] = asha.on_trial_result(None, bad, {"step": 2, "objective": 4.0})
    assert actions == {ASHAScheduler: TrialScheduler.CONTINUE, RestorableASHA: TrialScheduler.STOP}


def _asha(cls, **kwargs):
    from ray.tune.schedulers import FIFOScheduler  # noqa: F401 - Ray's schedulers import in one go

    settings = dict(time_attr="step", metric="objective", mode="max", max_t=8, grace_period=2, reduction_factor=2,
                    stop_last_trials=False)
    return cls(**{**settings, **kwargs})


def _trial(name, status="RUNNING", last_result=None):
    from types import SimpleNamespace

    return SimpleNamespace(trial_id=name, status=status, last_result=last_result or {})


def test_diverged_trials_are_the_worst_at_every_rung_and_the_cutoff_stays_a_number():
    """Rungs at steps 2 and 4 (grace 2, factor 2). Plain ASHA: after one -inf at a rung its percentile is
    -inf or NaN and every later trial passes, diverged or poor; here each is stopped where the rule says."""
    import math

    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    from perceive_ir.search.runner import RestorableASHA

    CONTINUE, STOP = TrialScheduler.CONTINUE, TrialScheduler.STOP
    # (trial, step, objective) in arrival order, and what ASHA's rule says: below the rung's median (its
    # recorded results, a diverged one the worst) stops; a poor trial behind two diverged ones still ranks
    # in the top half (d), and is stopped once the rung holds enough real results (h)
    sequence = [("a", 2, 25.0, CONTINUE), ("b", 2, -math.inf, STOP), ("c", 2, -math.inf, STOP),
                ("d", 2, 5.0, CONTINUE), ("e", 2, 30.0, CONTINUE),
                ("a", 4, 26.0, CONTINUE), ("e", 4, -math.inf, STOP), ("f", 2, 27.0, CONTINUE),
                ("f", 4, 20.0, CONTINUE), ("g", 2, math.nan, STOP), ("h", 2, 3.0, STOP),
                ("d", 4, math.inf * 0, STOP), ("i", 4, 21.0, CONTINUE)]
    decisions = {}
    for cls in (ASHAScheduler, RestorableASHA):
        asha = _asha(cls)
        trials = {}
        decisions[cls] = []
        for name, step, value, _ in sequence:
            if name not in trials:
                trials[name] = _trial(name)
                asha.on_trial_add(None, trials[name])
            decisions[cls].append(asha.on_trial_result(None, trials[name], {"step": step, "objective": value}))
    assert decisions[RestorableASHA] == [expected for *_, expected in sequence]
    assert decisions[ASHAScheduler] != decisions[RestorableASHA]  # the defect this guards against is real


def test_a_relaunched_search_restores_asha_rung_by_rung_from_the_reported_history():
    """Three rungs (2, 4, 8). Three trials of the first launch reached the last rung; after a relaunch the
    new trials meet the same bars at every rung as in the uninterrupted search."""
    from ray.tune.schedulers import TrialScheduler

    from perceive_ir.search.runner import RestorableASHA
    from perceive_ir.search.trainable import HISTORY

    first = {"a": [[2, 30.0], [4, 31.0], [8, 32.0]], "b": [[2, 29.0], [4, 30.5], [8, 31.5]],
             "c": [[2, 28.0], [4, 30.0], [8, 33.0]]}
    later = [("d", 2, 29.5), ("d", 4, 29.0), ("e", 2, 27.0), ("f", 2, 31.0), ("f", 4, 31.2), ("f", 8, 30.0)]

    def run(restored: bool) -> list[str]:
        asha = _asha(RestorableASHA, max_t=16)
        if restored:  # what Tune hands a relaunched search: each trial with its last result
            for name, history in first.items():
                step, value = history[-1]
                asha.on_trial_add(None, _trial(name, "TERMINATED", {"step": step, "objective": value,
                                                                     HISTORY: history}))
        else:
            for name, history in first.items():
                trial = _trial(name)
                asha.on_trial_add(None, trial)
                for step, value in history:
                    asha.on_trial_result(None, trial, {"step": step, "objective": value})
                asha.on_trial_complete(None, trial, {"step": history[-1][0], "objective": history[-1][1]})
        trials, actions = {}, []
        for name, step, value in later:
            if name not in trials:
                trials[name] = _trial(name)
                asha.on_trial_add(None, trials[name])
            actions.append(asha.on_trial_result(None, trials[name], {"step": step, "objective": value}))
        return actions

    uninterrupted = run(restored=False)
    assert run(restored=True) == uninterrupted
    assert uninterrupted.count(TrialScheduler.STOP) >= 3  # the bars are real: d at 4, e at 2, f at 8


def test_relative_paths_of_a_search_resolve_against_the_launch_folder_for_every_trial(
        package_photos, perceiver, tmp_path, monkeypatch):
    """As a stage job's: the trials, started in the repository's copy, get the launch folder's paths;
    and each space key's extreme values are checked in a trial config before Ray starts."""
    import ray

    from perceive_ir.orchestration.preflight import PreflightError
    from perceive_ir.search.preflight import preflight_search

    def with_repository_files(path: Path) -> Path:  # the DeepSpeed config stays the repository's
        search = yaml.safe_load(path.read_text())
        search["stage2"]["engine"] = {"deepspeed_config": str(REPO / "configs/deepspeed/zero1.json")}
        path.write_text(yaml.safe_dump(search))
        return path

    build_tiny_shards(package_photos, str(tmp_path / "runs" / "shards"))
    config = with_repository_files(write_search(tmp_path, "runs/shards", perceiver, {"path": "runs/ray"},
                                                base=str(REPO / "configs/stage2_tiny.yaml"),
                                                space={"optimizer.lr": {"grid": [1e-3]}}))
    monkeypatch.chdir(tmp_path)
    plan = plan_search(config)
    preflight_search(plan, working_dir=REPO)
    trial = plan.trial_config({"optimizer.lr": 1e-3}, "trial-1", plan.base.storage.path + "/train")
    assert trial.data.train.sources[0].location == str(tmp_path / "runs" / "shards")
    assert plan.base.storage.path == str(tmp_path / "runs" / "ray")
    assert trial.storage.path == str(tmp_path / "runs" / "ray" / "train")
    assert trial.tracking.uri == f"sqlite:///{tmp_path / 'mlflow.db'}"

    missing = REPO / "configs/deepspeed/none.json"
    bad = with_repository_files(write_search(
        tmp_path, "runs/shards", perceiver, {"path": "runs/ray"}, base=str(REPO / "configs/stage2_tiny.yaml"),
        space={"engine.deepspeed_config": {"choice": [str(REPO / "configs/deepspeed/zero1.json"), str(missing)]}}))
    with pytest.raises(PreflightError, match=rf"'engine.deepspeed_config': in a trial with search space "
                                             rf"'engine.deepspeed_config' = '{missing}': .*does not exist"):
        preflight_search(plan_search(bad), working_dir=REPO)
    assert not ray.is_initialized()


def test_a_search_whose_trials_all_fail_says_why_and_fails(package_photos, perceiver, tmp_path, monkeypatch, capsys):
    """The shards are gone after the pre-flight, so only the trials see it: the search ends FAILED, its
    MLflow run says why, and the job exits 1 naming the error and how many trials it hit."""
    import ray
    from mlflow.tracking import MlflowClient

    monkeypatch.syspath_prepend(str(REPO / "jobs"))
    import tune
    from perceive_ir.search.preflight import preflight_search
    from perceive_ir.search.runner import run_search

    shards = tmp_path / "shards"
    build_tiny_shards(package_photos, str(shards))
    config = write_search(tmp_path, str(shards), perceiver, {"path": str(tmp_path / "ray")},
                          space={"optimizer.lr": {"grid": [1e-3, 1e-2]}})
    monkeypatch.chdir(REPO)
    plan = plan_search(config)
    preflight_search(plan, working_dir=REPO)
    shutil.rmtree(shards)
    try:
        result = run_search(plan, REPO)
    finally:
        ray.shutdown()
    assert result.outcome.completed == 0 and result.outcome.errored == 2, result.outcome
    (line,) = result.outcome.error_lines()
    assert line.startswith("2 trials: ") and "no shard manifest" in line and str(shards) in line, line
    assert result.registered is None
    parent = MlflowClient(tracking_uri=result.tracking_uri).get_run(result.parent_run_id)
    assert parent.info.status == "FAILED"
    assert "no shard manifest" in parent.data.tags["search.errors"] and parent.data.tags["search.trials_errored"] == "2"
    assert tune.report(plan, result) == 1
    err = capsys.readouterr().err
    assert "no trial completed (2 errored)" in err and "no shard manifest" in err and "ended FAILED" in err


def test_a_relaunch_with_other_search_settings_is_refused_naming_each_change(tmp_path, perceiver):
    """Space, scheduler, metric and the base config's run identity (an edited base YAML included) must
    stay for a relaunch to continue a search; concurrency and cluster capacity may change."""
    from perceive_ir.orchestration.preflight import PreflightError
    from perceive_ir.search import preflight as search_preflight
    from perceive_ir.search.tracking import open_parent_run, relaunch_changes

    config = write_search(tmp_path, "shards", perceiver, {"path": str(tmp_path / "ray")})
    plan = plan_search(config)
    assert relaunch_changes(plan) == (None, [])
    open_parent_run(plan)
    raw = yaml.safe_load(config.read_text())
    raw.update(concurrency=1, cluster_capacity={"CPU": 4})
    config.write_text(yaml.safe_dump(raw))
    assert relaunch_changes(plan_search(config))[1] == []
    raw["space"]["loss.l3"] = {"quniform": [0.05, 0.3, 0.05]}
    raw["space"]["loss.l1"] = {"uniform": [0.1, 0.2]}
    raw["scheduler"]["reduction_factor"] = 2
    raw["stage2"]["loss"] = {"l2": 0.5}  # a new override: the base's identity shows it
    config.write_text(yaml.safe_dump(raw))
    run_id, changed = relaunch_changes(plan_search(config))
    assert {key for key, *_ in changed} == {"space.loss.l3", "space.loss.l1", "search.scheduler.reduction_factor",
                                          "base.loss.l2"}
    assert ("space.loss.l1", "(none)", "uniform [0.1, 0.2]") in changed
    with pytest.raises(PreflightError, match=f"a search named '{SEARCH}' \\(MLflow run {run_id}\\) ran with other "
                                             "settings.*space.loss.l1.*another name"):
        search_preflight._check_relaunch(plan_search(config))


def test_the_quality_score_improves_the_objective_whatever_the_mode():
    from perceive_ir.search.config import QUALITY_METRIC, MetricConfig
    from perceive_ir.search.trainable import objective_of

    scores = {"val/mean/psnr_out": 30.0, "val/mean/lpips": 0.2, QUALITY_METRIC: 0.5}
    assert objective_of(scores, MetricConfig("val/mean/psnr_out", "max", 2.0)) == pytest.approx(31.0)
    assert objective_of(scores, MetricConfig("val/mean/lpips", "min", 0.1)) == pytest.approx(0.15)
