"""One trial: a stage-2 Ray Train + DeepSpeed run started from a Tune function, the pattern Ray Train V2
documents for Tune (``TuneReportCallback`` in the trainer's ``RunConfig``).

Each checkpoint of the trial's run is a validation (the trial config sets ``checkpoint_every`` to
``val_every``); the callback forwards that validation's metrics, which rank 0 reports with the
checkpoint, with the objective and its history. A trial's run is named
``<search>-<trial id>`` and stored under ``<storage.path>/<search>/train``: launched again (after a driver
restart) it resumes from its last checkpoint, and a trial whose run already ended is not trained again.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from pathlib import Path
from typing import Any, Optional

from ray.tune.integration.ray_train import TuneReportCallback

from perceive_ir.search.config import QUALITY_METRIC, MetricConfig

log = logging.getLogger(__name__)

__all__ = ["ValidationReportCallback", "run_trial", "objective_of", "objective_history", "trial_run_name",
           "SEARCH_TAGS", "OBJECTIVE", "HISTORY"]

SEARCH_TAGS = {"parent": "mlflow.parentRunId", "name": "search.name", "trial": "search.trial_id",
               "early_stopped": "search.early_stopped"}
OBJECTIVE = "objective"
HISTORY = "objective_history"  # [[step, objective], ...]: every validation so far, in each report


def objective_of(metrics: dict[str, float], metric: MetricConfig) -> Optional[float]:
    """The searched number; a diverged trial (NaN) counts as the worst possible, so schedulers stop it."""
    if metric.name not in metrics:
        return None
    value = metrics[metric.name]
    if metric.quality_weight:  # a higher quality score is better: it improves the objective in either mode
        sign = 1.0 if metric.mode == "max" else -1.0
        value += sign * metric.quality_weight * metrics.get(QUALITY_METRIC, 0.0)
    if math.isnan(value):
        return -math.inf if metric.mode == "max" else math.inf
    return value


def objective_history(client, run_id: str, metric: MetricConfig) -> list[list[float]]:
    """``[step, objective]`` of every validation the run logged: what a relaunched search's scheduler puts
    back into its rungs (see ``RestorableASHA``)."""
    quality = {m.step: m.value for m in client.get_metric_history(run_id, QUALITY_METRIC)} \
        if metric.quality_weight else {}
    history = []
    for m in sorted(client.get_metric_history(run_id, metric.name), key=lambda m: m.step):
        value = objective_of({metric.name: m.value, QUALITY_METRIC: quality.get(m.step, 0.0)}, metric)
        history.append([m.step, value])
    return history


def trial_run_name(search: str, trial_id: str) -> str:
    return f"{search}-{trial_id}"


class ValidationReportCallback(TuneReportCallback):
    """Forwards each validation of the trial's run to Tune: ``step``, the ``val/`` metrics, ``objective``
    and the objective's history. They come with the checkpoint's report (rank 0 adds its validation of
    the step), so no score is read back from the tracking store.

    This runs in the trial's Train controller, where an error is not retried and a wait stalls every
    worker at its next report, while the store may be away for minutes. So the controller's thread never
    calls MLflow: a watcher thread reads, as the store allows, the validations of earlier launches (a
    resumed run) and the scheduler's early-stop mark, which ends the run."""

    def __init__(self, tracking_uri: str, run_name: str, experiment: str, metric: MetricConfig,
                 poll_s: float = 2.0) -> None:
        super().__init__()
        self.tracking_uri, self.run_name, self.experiment, self.metric = tracking_uri, run_name, experiment, metric
        self.poll_s = poll_s
        self._earlier: Optional[dict[int, float]] = None  # step -> objective of earlier launches, once read
        self._this_launch: dict[int, float] = {}
        self._watcher: Optional[threading.Thread] = None

    def __getstate__(self) -> dict:  # sent to the controller before its watcher starts
        return {**self.__dict__, "_watcher": None}

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        if self._watcher is None:
            self._watcher = threading.Thread(target=self._watch, name=f"{self.run_name}-store-watch", daemon=True)
            self._watcher.start()
        reported = metrics[0] if metrics else {}
        validation = {k: float(v) for k, v in reported.items() if k.startswith("val/")}
        objective = objective_of(validation, self.metric)
        if objective is None:
            return  # a checkpoint without a validation
        step = int(reported["step"])
        self._this_launch[step] = objective
        history = [[s, v] for s, v in sorted({**(self._earlier or {}), **self._this_launch}.items())]
        self._training_actor_item_queue.put({"step": step, OBJECTIVE: objective, HISTORY: history, **validation})

    def _watch(self) -> None:
        """Until the run ends: read the earlier validations once, then the early-stop mark every ``poll_s``;
        on the mark, abort the run (from within its controller)."""
        import ray
        from mlflow.tracking import MlflowClient

        from perceive_ir.tracking import RUN_NAME_TAG
        from perceive_ir.tracking.buffer import limit_client_retries

        limit_client_retries(1, 10)  # this process's only MLflow calls: short tries, retried here
        client, run_id, away = MlflowClient(tracking_uri=self.tracking_uri), None, False
        while True:
            try:
                if run_id is None:
                    experiment = client.get_experiment_by_name(self.experiment)
                    (found,) = client.search_runs([experiment.experiment_id],
                                                  f"tags.`{RUN_NAME_TAG}` = '{self.run_name}'", max_results=1)
                    run_id = found.info.run_id
                if self._earlier is None:
                    self._earlier = {int(step): value for step, value in objective_history(client, run_id, self.metric)}
                if client.get_run(run_id).data.tags.get(SEARCH_TAGS["early_stopped"]) == "true":
                    log.info("%s was stopped by the scheduler: aborting its training run", self.run_name)
                    ray.get_runtime_context().current_actor.abort.remote()
                    return
                away = False
            except Exception as err:  # noqa: BLE001 - MLflow raises many kinds; read again at the next poll
                if not away:
                    log.warning("%s: tracking store not answering (%s); early-stop mark and earlier validations "
                                "read once it answers", self.run_name,
                                str(err).splitlines()[0] if str(err) else type(err).__name__)
                away = True
            time.sleep(self.poll_s)


def _ended_run(tracking_uri: str, experiment: str, run_name: str):
    """The trial's MLflow run if it already ended (finished, or stopped early by the scheduler)."""
    from mlflow.tracking import MlflowClient

    from perceive_ir.tracking import RUN_NAME_TAG

    client = MlflowClient(tracking_uri=tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = client.search_runs([found.experiment_id], f"tags.`{RUN_NAME_TAG}` = '{run_name}'", max_results=1)
    if runs and (runs[0].info.status == "FINISHED" or runs[0].data.tags.get(SEARCH_TAGS["early_stopped"]) == "true"):
        return runs[0]
    return None


def run_trial(values: dict[str, Any], context: dict[str, Any]) -> None:
    """The Tune function: ``values`` are the sampled settings; ``context`` what the driver fixed."""
    import ray.tune

    from perceive_ir.config import from_dict
    from perceive_ir.orchestration.trainer import launch
    from perceive_ir.orchestration.worker import job_root
    from perceive_ir.search.config import SearchConfig, make_plan
    from perceive_ir.tracking import resolve_tracking_uri
    from perceive_ir.tracking.buffer import limit_client_retries
    from perceive_ir.tracking.mlflow_run import when_store_answers

    logging.basicConfig(level=logging.INFO)
    root = job_root() or Path(context["repo"])
    os.chdir(root)  # Tune starts trials in their own folder; the configs' relative paths need the repository's
    cfg = from_dict(SearchConfig, context["search"], context["where"])
    plan = make_plan(cfg, context["where"])
    plan.resolved_settings = dict(context.get("resolved_settings") or {})
    name = trial_run_name(cfg.name, ray.tune.get_context().get_trial_id())
    trial_cfg = plan.trial_config(values, name, context["train_storage"])
    tracking_uri = resolve_tracking_uri(trial_cfg.tracking)
    limit_client_retries(trial_cfg.tracking.http_max_retries, trial_cfg.tracking.http_timeout_s)
    # Tune restarts a trial whose node was lost at once, and the store may be away at that moment (each
    # failed start would spend one of the trial's max_trial_failures)
    ended = when_store_answers(lambda: _ended_run(tracking_uri, trial_cfg.tracking.experiment, name), tracking_uri,
                               cfg.trial_store_wait_s, name, "trial_store_wait_s")
    if ended is not None:  # ended before the driver was restarted: replay its last validation, train nothing
        validation = {k: v for k, v in ended.data.metrics.items() if k.startswith("val/")}
        objective = objective_of(validation, cfg.metric)
        if objective is not None:
            from mlflow.tracking import MlflowClient

            history = objective_history(MlflowClient(tracking_uri=tracking_uri), ended.info.run_id, cfg.metric)
            ray.tune.report({"step": history[-1][0], OBJECTIVE: objective, HISTORY: history, **validation})
        return
    tags = {SEARCH_TAGS["parent"]: context["parent_run_id"], SEARCH_TAGS["name"]: cfg.name,
            SEARCH_TAGS["trial"]: ray.tune.get_context().get_trial_id()}
    params = {f"search/{key}": value for key, value in values.items()}
    callback = ValidationReportCallback(tracking_uri, name, trial_cfg.tracking.experiment, cfg.metric)
    launch("stage2", trial_cfg, working_dir=root, callbacks=[callback], run_tags=tags, run_params=params)
