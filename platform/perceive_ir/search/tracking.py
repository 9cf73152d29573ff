"""MLflow for a search: one parent run per search name (continued on relaunch), the trials' stage-2
runs nested under it (tag ``mlflow.parentRunId``), early-stopped trials marked, the results and plot
logged to the parent, and the best trial's restorer registered with the search's lineage as tags."""

from __future__ import annotations

import logging
import math
import tempfile
import time
from pathlib import Path
from typing import Optional

from ray.tune import Callback

from perceive_ir.config import flatten
from perceive_ir.orchestration.config import identity_settings
from perceive_ir.search.config import QUALITY_METRIC, SearchPlan
from perceive_ir.search.outcome import SearchOutcome
from perceive_ir.search.report import TrialRecord, write_plot, write_table
from perceive_ir.search.trainable import SEARCH_TAGS, objective_of, trial_run_name
from perceive_ir.tracking import RUN_NAME_TAG, RunTracker, find_or_create_run, version_tags
from perceive_ir.tracking.mlflow_run import existing_run, redact_params

log = logging.getLogger(__name__)

__all__ = ["open_parent_run", "search_params", "relaunch_changes", "SEARCH_IDENTITY", "trial_runs",
           "mark_early_stopped", "trial_records", "log_results", "register_best", "EarlyStopMarker"]

BEST_TAG = "search.best_registered"


# What a search's trials and decisions rest on: a relaunch under the same name that changed one of these
# would mix trials of two searches in one scheduler and one table. The rest (concurrency, cluster
# capacity, intervals, registration) may change between launches.
SEARCH_IDENTITY = ("space.", "search.base", "search.stage2.", "search.metric.", "search.scheduler.",
                   "search.search.", "search.num_trials", "base.")


def search_params(plan: SearchPlan) -> dict[str, str]:
    """The search run's params: its settings, its space, and the base config's run identity (so that an
    edited base YAML shows too)."""
    params = {f"search.{k}": v for k, v in flatten(plan.cfg).items() if not k.startswith("space.")}
    params.update({f"space.{d.key}": f"{d.kind} {list(d.args)}" for d in plan.distributions})
    params.update({f"base.{k}": v for k, v in identity_settings(flatten(plan.base)).items()})
    return redact_params(params)


def relaunch_changes(plan: SearchPlan) -> tuple[Optional[str], list[tuple[str, str, str]]]:
    """``(run id, [(setting, before, now), ...])`` of the search run a launch under this name continues:
    the identity settings that differ (a space key added or removed counts); ``(None, [])`` for a new search."""
    found = existing_run(plan.base.tracking, plan.cfg.name)
    if found is None:
        return None, []
    run_id, before = found
    now = search_params(plan)
    keys = {k for k in now if k.startswith(SEARCH_IDENTITY) and (k in before or k.startswith("space."))}
    keys |= {k for k in before if k.startswith("space.")}  # a space key removed since
    return run_id, sorted((k, before.get(k, "(none)"), now.get(k, "(none)")) for k in keys
                          if before.get(k) != now.get(k))


def open_parent_run(plan: SearchPlan) -> tuple[str, str, bool]:
    """``(tracking URI, parent run id, created)``: the search's run, in the stage-2 runs' experiment."""
    return find_or_create_run(plan.base.tracking, plan.cfg.name, search_params(plan), version_tags(), "tune")


def trial_runs(client, plan: SearchPlan, parent_run_id: str) -> list:
    experiment = client.get_experiment_by_name(plan.base.tracking.experiment)
    if experiment is None:
        return []
    return client.search_runs([experiment.experiment_id], f"tags.`{SEARCH_TAGS['parent']}` = '{parent_run_id}'",
                              max_results=10000, order_by=["attributes.start_time ASC"])


def mark_early_stopped(client, run) -> None:
    """A trial the scheduler stopped: its run ends as KILLED with ``search.early_stopped=true`` (also when
    its aborted training reported the run FAILED on the way out)."""
    if run.info.status == "KILLED" or (run.info.status == "FINISHED"
                                       and run.data.tags.get(SEARCH_TAGS["early_stopped"]) != "true"):
        return
    client.set_tag(run.info.run_id, SEARCH_TAGS["early_stopped"], "true")
    client.set_terminated(run.info.run_id, status="KILLED")


class EarlyStopMarker(Callback):
    """A Tune callback: when a trial ends and its run did not finish, it was stopped early.

    A mark the tracking store cannot take now (an outage) is kept and tried again at later results,
    at most every ``retry_every_s``, and at the end of the search for up to ``final_wait_s``: an
    unmarked stopped trial would be trained again by a relaunch of the search."""

    def __init__(self, tracking_uri: str, experiment: str, search: str, retry_every_s: float = 30.0,
                 final_wait_s: float = 300.0) -> None:
        self.tracking_uri, self.experiment, self.search = tracking_uri, experiment, search
        self.retry_every_s, self.final_wait_s = retry_every_s, final_wait_s
        self.pending: list[str] = []  # trial ids whose mark is not written yet
        self._last_try = 0.0

    def _mark(self, trial_id: str) -> bool:
        from mlflow.tracking import MlflowClient

        try:
            client = MlflowClient(tracking_uri=self.tracking_uri)
            found = client.get_experiment_by_name(self.experiment)
            name = trial_run_name(self.search, trial_id)
            runs = client.search_runs([found.experiment_id], f"tags.`{RUN_NAME_TAG}` = '{name}'", max_results=1)
            if runs and runs[0].info.status != "FINISHED":
                mark_early_stopped(client, runs[0])
                log.info("trial %s stopped early by the scheduler", trial_id)
            return True
        except Exception as err:  # noqa: BLE001 - the store is away: try again later
            log.warning("trial %s: early-stop mark not written yet (%s); will try again", trial_id, err)
            return False

    def _retry(self) -> None:
        self._last_try = time.monotonic()
        self.pending = [trial_id for trial_id in self.pending if not self._mark(trial_id)]

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self.pending.append(trial.trial_id)
        self._retry()

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        if self.pending and time.monotonic() - self._last_try >= self.retry_every_s:
            self._retry()

    def on_experiment_end(self, trials, **info) -> None:
        deadline = time.monotonic() + self.final_wait_s
        while self.pending and time.monotonic() < deadline:
            time.sleep(min(5.0, max(0.0, deadline - time.monotonic())))
            self._retry()
        if self.pending:
            log.error("early-stop marks not written for trials %s: a relaunch would train them again",
                      ", ".join(self.pending))


def _status(run) -> str:
    if run.data.tags.get(SEARCH_TAGS["early_stopped"]) == "true":
        return "early-stopped"
    return {"FINISHED": "completed", "FAILED": "failed"}.get(run.info.status, "running")


def _value(text: str):
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def trial_records(client, plan: SearchPlan, parent_run_id: str) -> list[TrialRecord]:
    """Every trial's values, status and validation curve of the objective, best final objective first."""
    records = []
    for run in trial_runs(client, plan, parent_run_id):
        if run.data.tags.get(SEARCH_TAGS["early_stopped"]) == "true":
            mark_early_stopped(client, run)
        history = {key: {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
                   for key in {plan.cfg.metric.name, QUALITY_METRIC}}
        curve = []
        for step in sorted(history[plan.cfg.metric.name]):
            value = objective_of({k: h[step] for k, h in history.items() if step in h}, plan.cfg.metric)
            if value is not None:
                curve.append((step, value))
        values = {key: _value(run.data.params.get(f"search/{key}", "")) for key in plan.keys}
        records.append(TrialRecord(run.data.tags.get(SEARCH_TAGS["trial"], run.info.run_id), run.info.run_id,
                                   _status(run), values, curve, int(run.data.tags.get("launches", "1"))))
    sign = -1 if plan.cfg.metric.mode == "max" else 1
    return sorted(records, key=lambda r: (r.status != "completed", r.final is None or not math.isfinite(r.final),
                                          sign * (r.final or 0.0)))


def _best(records: list[TrialRecord]) -> Optional[TrialRecord]:
    """The first completed trial with a finite objective (records come best first)."""
    return next((r for r in records if r.status == "completed" and r.final is not None and math.isfinite(r.final)),
                None)


def log_results(tracker: RunTracker, plan: SearchPlan, records: list[TrialRecord],
                outcome: Optional[SearchOutcome] = None) -> None:
    label = plan.cfg.metric.name + (f" + {plan.cfg.metric.quality_weight} x quality" if plan.cfg.metric.quality_weight
                                    else "")
    with tempfile.TemporaryDirectory(prefix="search-") as folder:
        csv_path, md_path = write_table(records, plan.keys, Path(folder))
        if outcome is not None and outcome.errors:
            md_path.write_text(md_path.read_text() + outcome.markdown())
        plot = write_plot(records, plan.keys, {d.key for d in plan.distributions if d.is_log}, label, Path(folder))
        for path in (csv_path, md_path, plot):
            tracker.log_file(path, "search")
    best = _best(records)
    if best is not None:
        tracker.log_metrics({"best_objective": best.final}, step=best.last_step)
        tracker.client.set_tag(tracker.run_id, "search.best_trial", best.trial_id)
    counts = {s: sum(r.status == s for r in records) for s in ("completed", "early-stopped", "failed", "running")}
    for status, count in counts.items():
        tracker.client.set_tag(tracker.run_id, f"search.trials_{status.replace('-', '_')}", str(count))
    if outcome is not None:
        tracker.client.set_tag(tracker.run_id, "search.trials_errored", str(outcome.errored))
        if outcome.errors:  # MLflow tags hold up to 8000 characters
            tracker.client.set_tag(tracker.run_id, "search.errors", "\n".join(outcome.error_lines())[:8000])


RESOLVED_CONFIG = "config/stage2_resolved.yaml"  # logged by every stage-2 launch (orchestration.trainer)


def trained_config(tracking_uri: str, run_id: str):
    """The stage-2 config a trial run trained with (its resolved config artifact), or None."""
    import yaml
    from mlflow.tracking import MlflowClient

    from perceive_ir.config import from_dict
    from perceive_ir.orchestration.config import Stage2Config

    with tempfile.TemporaryDirectory(prefix="trial-config-") as folder:
        try:
            path = MlflowClient(tracking_uri=tracking_uri).download_artifacts(run_id, RESOLVED_CONFIG, folder)
        except Exception:  # noqa: BLE001 - MLflow raises several types for a missing artifact
            return None
        return from_dict(Stage2Config, yaml.safe_load(Path(path).read_text()), f"run {run_id}: {RESOLVED_CONFIG}")


def register_best(tracker: RunTracker, plan: SearchPlan, records: list[TrialRecord]) -> Optional[dict[str, str]]:
    """Register the best completed trial's restorer (once per search) with the search's lineage as tags;
    returns its URIs, also when an earlier launch of the search registered it."""
    from mlflow.tracking import MlflowClient

    from perceive_ir.orchestration.trainer import PRODUCTS, register_products

    best = _best(records)
    if best is None or not plan.cfg.register_as:
        return None
    parent_tags = tracker.client.get_run(tracker.run_id).data.tags
    if parent_tags.get(BEST_TAG, "").startswith(best.run_id + " "):  # registered by an earlier launch
        return dict(zip(PRODUCTS["stage2"], parent_tags[BEST_TAG].split()[1:]))
    trial_cfg = trained_config(tracker.uri, best.run_id)  # what the trial trained, hashed into its lineage
    if trial_cfg is None:  # a trial run without its resolved config: rebuilt from the plan
        log.warning("trial run %s has no %s: its config is rebuilt from the search", best.run_id, RESOLVED_CONFIG)
        trial_cfg = plan.trial_config(best.values, trial_run_name(plan.cfg.name, best.trial_id),
                                      plan.base.storage.path)
    uris = register_products("stage2", trial_cfg, RunTracker(tracker.uri, best.run_id), search_run=tracker.run_id,
                             register_as=plan.cfg.register_as)
    client = MlflowClient(tracking_uri=tracker.uri)
    tags = {"search.parent_run_id": tracker.run_id, "search.name": plan.cfg.name, "search.trial_id": best.trial_id,
            "search.objective": f"{best.final:.6g}", "search.metric": plan.cfg.metric.name,
            "perceiver": trial_cfg.perceiver, "medium_tier": trial_cfg.medium_tier or "none",
            **{f"search.value.{k}": str(v) for k, v in best.values.items()}}
    for uri in uris.values():
        name, version = uri[len("models:/"):].rsplit("/", 1)
        for key, value in tags.items():
            client.set_model_version_tag(name, version, key, value)
    tracker.client.set_tag(tracker.run_id, BEST_TAG, f"{best.run_id} {' '.join(uris.values())}")
    log.info("best trial %s (%s %.4f) registered as %s", best.trial_id, plan.cfg.metric.name, best.final,
             ", ".join(uris.values()))
    return uris
