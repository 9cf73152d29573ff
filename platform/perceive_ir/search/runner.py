"""Run a search: derive how many trials fit at once, start or continue the Tune experiment, then
write the record (table, plot) and register the best trial."""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler

from perceive_ir.config import ConfigError, to_dict
from perceive_ir.search.config import SearchPlan
from perceive_ir.search.outcome import SearchOutcome
from perceive_ir.search.space import to_tune_space
from perceive_ir.search.trainable import HISTORY

log = logging.getLogger(__name__)

__all__ = ["TrialResources", "trial_resources", "concurrent_trials", "asha_max_t", "run_search", "SearchResult",
           "LOST_TRIALS_TAG", "RestorableASHA", "worst_finite"]

LOST_TRIALS_TAG = "search.lost_trials"


@dataclass(frozen=True)
class TrialResources:
    """What one trial holds: its Ray Train workers' resources (all of them, custom ones included); the
    Tune function itself only memory."""

    workers: dict[str, float]
    driver_memory_bytes: int
    driver_resources: dict[str, float] = field(default_factory=dict)  # e.g. a stable nodes' resource

    @property
    def cpus(self) -> float:
        return self.workers.get("CPU", 0.0)

    @property
    def gpus(self) -> float:
        return self.workers.get("GPU", 0.0)

    def driver_bundle(self) -> dict[str, float]:
        # Ray refuses an all-zero bundle; memory exists on every node, so no custom resource is needed.
        return {"CPU": 0, "memory": float(self.driver_memory_bytes), **self.driver_resources}


def trial_resources(plan: SearchPlan) -> TrialResources:
    ray_cfg = plan.base.ray
    per_worker = {"CPU": 1.0, **ray_cfg.resources_per_worker}
    if ray_cfg.use_gpu:
        per_worker.setdefault("GPU", 1.0)
    return TrialResources({k: ray_cfg.max_workers * v for k, v in per_worker.items() if v},
                          plan.cfg.trial_driver_memory_mb * 2**20, dict(plan.cfg.trial_driver_resources))


def concurrent_trials(requested: int, num_trials: int, trial: TrialResources, cluster: dict[str, float],
                      capacity: Optional[dict[str, float]] = None) -> int:
    """Trials run at once so that all of their workers fit together: no trial waits forever for
    resources another running trial holds. ``capacity`` is what an autoscaling cluster can grow to
    (the resources of its worker groups at maxReplicas): where it says more than the nodes up now, the
    trials are sized to it and the autoscaler adds nodes as they ask. Raises if a single trial does not fit."""
    most = {k: max(cluster.get(k, 0.0), (capacity or {}).get(k, 0.0)) for k in trial.workers}
    fits = min((math.floor(most[k] / need) for k, need in trial.workers.items()), default=requested)
    if fits < 1:
        needs = ", ".join(f"{v:g} {k}" for k, v in trial.workers.items())
        has = ", ".join(f"{most[k]:g} {k}" for k in trial.workers)
        raise ConfigError(f"one trial needs {needs} (ray.num_workers x ray.resources_per_worker of the stage-2 "
                          f"config); the cluster has {has} (now, or as cluster_capacity says it can grow)")
    return max(1, min(requested, num_trials, fits))


def asha_max_t(max_steps: int, val_every: int, grace_period: int) -> int:
    """ASHA's horizon: the last validation before the final step, so that no trial is stopped at its very
    end (the restorer is saved after the last report)."""
    last = ((max_steps - 1) // val_every) * val_every
    if last < grace_period:
        raise ConfigError(f"scheduler.grace_period {grace_period} leaves ASHA no validation to stop at: the last "
                          f"validation before loop.max_steps {max_steps} is at step {last} (loop.val_every "
                          f"{val_every})")
    return last


class RestorableASHA(ASHAScheduler):
    """ASHA that stays correct after diverged trials and relaunches.

    A non-finite objective (a diverged trial: -inf when maximising) enters the rungs as the worst finite
    value: ASHA's cutoff is a percentile of a rung's results, and one -inf among them makes it -inf or
    NaN, after which nothing is stopped at that rung again. And Tune stores no scheduler state: a
    relaunched search hands each restored trial to ``on_trial_add``, where its reported history
    (``objective_history``: every validation's step and objective) is put back rung by rung, so that
    no rung starts empty and the first new trials to reach it pass whatever they score."""

    def _finite(self, result: dict) -> dict:
        value = result.get(self._metric) if self._metric else None
        if value is None or math.isfinite(value):
            return result
        return {**result, self._metric: worst_finite(self._mode)}

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        return super().on_trial_result(tune_controller, trial, self._finite(result))

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        super().on_trial_complete(tune_controller, trial, self._finite(result))

    def on_trial_add(self, tune_controller, trial) -> None:
        super().on_trial_add(tune_controller, trial)
        if not trial.last_result or self._time_attr not in trial.last_result:
            return  # a new trial
        last = trial.last_result
        history = last.get(HISTORY) or [[last[self._time_attr], last.get(self._metric)]]
        bracket = self._trial_info[trial.trial_id]
        for step, value in sorted(history):  # each validation, in order: every rung it passed
            finite = self._finite({self._metric: value})[self._metric]
            if finite is not None:
                bracket.on_result(trial, step, self._metric_op * finite)
        if trial.status == Trial.TERMINATED:
            del self._trial_info[trial.trial_id]


def worst_finite(mode: str) -> float:
    """The rung value of a diverged trial: below (above, when minimising) any real score, and finite,
    so that percentiles of a rung stay numbers."""
    return -1e300 if mode == "max" else 1e300


def _scheduler(plan: SearchPlan):
    from ray.tune.schedulers import FIFOScheduler

    sched = plan.cfg.scheduler
    if sched.name == "fifo":
        return FIFOScheduler()
    loop = plan.base.loop
    return RestorableASHA(time_attr="step", max_t=asha_max_t(loop.max_steps, loop.val_every, sched.grace_period),
                          grace_period=sched.grace_period, reduction_factor=sched.reduction_factor,
                          stop_last_trials=False)


def _search_algorithm(plan: SearchPlan, concurrency: int):
    from ray.tune.search.basic_variant import BasicVariantGenerator

    algorithm = plan.cfg.search
    if algorithm.name == "optuna":
        from optuna.samplers import TPESampler
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(sampler=TPESampler(seed=algorithm.seed))
    return BasicVariantGenerator(max_concurrent=concurrency, random_state=algorithm.seed)


@dataclass
class SearchResult:
    parent_run_id: str
    tracking_uri: str
    records: list
    registered: Optional[dict[str, str]]
    resumed: bool
    fit_s: float  # wall time of Tune's fit: the trials, without the record and the registration after it
    outcome: SearchOutcome  # trials completed, and the errors of those that failed


def run_search(plan: SearchPlan, repo: Path) -> SearchResult:
    """Start the search, or continue the one stored under ``<storage.path>/<name>`` (finished trials are
    kept; unfinished ones resume from their runs' last checkpoints)."""
    import ray
    from ray import tune

    from perceive_ir.orchestration.storage import run_storage
    from perceive_ir.orchestration.ray_runtime import connect, pin_autoscaling_coordinator_here
    from perceive_ir.search.trainable import OBJECTIVE, run_trial
    from perceive_ir.search.tracking import EarlyStopMarker, log_results, open_parent_run, register_best, trial_records
    from perceive_ir.tracking import RunTracker

    cfg, base = plan.cfg, plan.base
    storage_path, filesystem = run_storage(base.storage)
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", str(cfg.state_save_period_s))
    # A stopped trial's function is blocked in its Train run's fit(): Tune waits this long (600 s by default)
    # before killing it, and the run's workers keep their CPUs meanwhile.
    os.environ.setdefault("TUNE_FORCE_TRIAL_CLEANUP_S", str(cfg.stopped_trial_grace_s))
    connect(base.ray, repo)
    pin_autoscaling_coordinator_here()
    resources = trial_resources(plan)
    trials = plan.total_trials
    concurrency = concurrent_trials(cfg.concurrency, trials, resources, ray.cluster_resources(), cfg.cluster_capacity)
    log.info("%s: %d trials, %d at a time (each: %s)", cfg.name, trials, concurrency,
             ", ".join(f"{v:g} {k}" for k, v in resources.workers.items()))
    tracking_uri, parent_run_id, created = open_parent_run(plan)
    tracker = RunTracker(tracking_uri, parent_run_id)
    context: dict[str, Any] = {"search": to_dict(cfg), "where": plan.where, "repo": str(repo),
                               "parent_run_id": parent_run_id, "resolved_settings": dict(plan.resolved_settings),
                               "train_storage": f"{base.storage.path.rstrip('/')}/{cfg.name}/train"}
    trainable = tune.with_resources(tune.with_parameters(run_trial, context=context), resources.driver_bundle())
    experiment = f"{storage_path}/{cfg.name}"
    resumed = tune.Tuner.can_restore(experiment, storage_filesystem=filesystem)
    if resumed:
        log.info("%s: continuing the search stored at %s", cfg.name, experiment)
        tuner = tune.Tuner.restore(experiment, trainable, resume_unfinished=True, resume_errored=True,
                                   storage_filesystem=filesystem)
    else:
        tuner = tune.Tuner(
            trainable, param_space=to_tune_space(plan.distributions),
            tune_config=tune.TuneConfig(metric=OBJECTIVE, mode=cfg.metric.mode, num_samples=cfg.num_trials,
                                        max_concurrent_trials=concurrency if cfg.search.name == "optuna" else None,
                                        scheduler=_scheduler(plan),
                                        search_alg=_search_algorithm(plan, concurrency)),
            run_config=tune.RunConfig(name=cfg.name, storage_path=storage_path, storage_filesystem=filesystem,
                                      callbacks=[EarlyStopMarker(tracking_uri, base.tracking.experiment, cfg.name)],
                                      failure_config=tune.FailureConfig(max_failures=cfg.max_trial_failures),
                                      verbose=1))
    start = time.perf_counter()
    try:
        grid = tuner.fit()
        ran = len(grid)
        fit_s = time.perf_counter() - start
    except Exception:
        tracker.finish("FAILED")
        raise
    if ran < trials:
        # Tune uploads its trial list and its searcher's state as separate files: a driver killed
        # between the two uploads can come back with a searcher ahead of its trials.
        log.warning("%s: %d of %d planned trials ran; most likely an earlier driver was killed while Tune "
                    "saved its state, losing the trials it had just created", cfg.name, ran, trials)
        tracker.set_tags({LOST_TRIALS_TAG: str(trials - ran)})
    from mlflow.tracking import MlflowClient

    from perceive_ir.tracking.mlflow_run import when_store_answers

    client = MlflowClient(tracking_uri=tracking_uri)
    # the trials are done and their runs stored: a store away at this moment is waited for, not a failure
    records = when_store_answers(lambda: trial_records(client, plan, parent_run_id), tracking_uri,
                                 cfg.trial_store_wait_s, cfg.name, "trial_store_wait_s")
    outcome = SearchOutcome.of(sum(r.status == "completed" for r in records),
                               [result.error for result in grid if result.error is not None])
    log_results(tracker, plan, records, outcome)
    if outcome.completed == 0:
        log.error("%s: no trial completed; %s", cfg.name, "; ".join(outcome.error_lines()) or "no trial error recorded")
        tracker.finish("FAILED")
        return SearchResult(parent_run_id, tracking_uri, records, None, resumed, fit_s, outcome)
    registered = register_best(tracker, plan, records)
    tracker.finish("FINISHED")
    return SearchResult(parent_run_id, tracking_uri, records, registered, resumed, fit_s, outcome)
