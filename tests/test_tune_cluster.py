"""A search on a multi-node Ray cluster on this machine (tests/_tune_cluster.py): a trial whose stable
node is lost during a tracking outage is restarted by Tune on the other stable node, waits for the
store, resumes its run from its last checkpoint and completes; every validation, those during the
outage included, reached Tune.
"""

from __future__ import annotations

import json

import pytest

from _tune_cluster import node_loss_drill, resumed_runs
from conftest import REPO

pytestmark = pytest.mark.slow

MAX_STEPS = 150  # the node goes at about step 30: the drill has time to spare on a loaded machine
VAL_EVERY = 10
STORE_AWAY_S = 10  # after the node's loss


def test_a_trial_whose_node_is_lost_during_a_tracking_outage_resumes_and_completes(package_photos, tmp_path,
                                                                                    monkeypatch):
    monkeypatch.chdir(REPO)
    drill = node_loss_drill(tmp_path, package_photos, STORE_AWAY_S, MAX_STEPS, VAL_EVERY)
    seen, result = drill.seen, drill.result
    try:
        assert "error" not in seen, str(seen.get("error"))
        assert "lost_at" in seen, f"the search ended before the drill: {seen}"
        assert "ImplicitFunc" in seen["killed_actors"]  # a trial function (and its Train controller) went
        assert "_AutoscalingCoordinatorActor" not in seen["killed_actors"]  # the driver placed it on the head
        assert result.outcome.completed == 2 and not result.outcome.errors, result.outcome.error_lines()
        assert {r.status for r in result.records} == {"completed"}
        resumed = resumed_runs(drill)
        assert resumed, "no trial was restarted"
        for name, run in resumed.items():
            assert run["status"] == "FINISHED"
            # resumed from its last checkpoint, not step 0: the last one on disk, or the one before it when the
            # node went between writing a checkpoint and reporting it to Ray Train (or one written at that instant)
            assert run["resumed_from"] >= seen["at_kill"][name][-2:][0] > 0, (name, run["resumed_from"], seen["at_kill"])
            # what the killed worker had not yet sent to the store is lost with it (its buffer is in memory);
            # everything after its checkpoint is there
            assert set(range(run["resumed_from"] + 1, MAX_STEPS + 1)) <= run["steps"]
            print(f"{name}: node lost -> first resumed step {run['loss_to_resumed_s']:.1f} s (the store away "
                  f"for the first {STORE_AWAY_S} s); first launch -> first step {run['start_to_first_step_s']:.1f} s")
        trials = list(drill.experiment_root.glob("run_trial_*"))
        assert len(trials) == 2
        for trial_dir in trials:  # every validation reached Tune, those during the outage included
            reported = {json.loads(line)["step"] for line in (trial_dir / "result.json").read_text().splitlines()}
            assert sorted(reported) == list(range(VAL_EVERY, MAX_STEPS + 1, VAL_EVERY)), (trial_dir.name, reported)
    finally:
        drill.server.stop()
