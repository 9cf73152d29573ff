"""The search's pre-flight, on the driver before Ray starts: the base stage-2 config's local paths and
its tracking store are resolved against the launch folder exactly as a stage job's are (and handed to
every trial), then a trial config is checked at each space key's extreme values."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Optional

from perceive_ir.orchestration.config import path_settings
from perceive_ir.orchestration.preflight import PreflightError, describe_changes, preflight
from perceive_ir.search.config import SearchPlan
from perceive_ir.tracking import resolve_tracking_uri

__all__ = ["preflight_search"]

_PROBE_NAME = "preflight-probe"


def preflight_search(plan: SearchPlan, working_dir: Optional[Path], launch_dir: Optional[Path] = None) -> None:
    """Check the base config (tracking store, stage-1 products, shards, storage) and a trial config at
    every extreme value of the space. ``plan.base`` becomes the resolved base, and
    ``plan.resolved_settings`` what every trial config takes from it. Raises :class:`PreflightError`."""
    base = copy.deepcopy(plan.base)
    preflight("stage2", base, working_dir=working_dir, launch_dir=launch_dir, check_relaunch=False)
    before = path_settings(plan.base)
    # a trial's storage.path is its own folder under the search's, derived from the resolved base
    plan.resolved_settings = {key: value for key, value in path_settings(base).items()
                              if before.get(key) != value and key != "storage.path"}
    # the store as the driver sees it (a default store is relative to the launch folder, and trials run
    # elsewhere; MLFLOW_TRACKING_URI is not passed to them)
    base.tracking.uri = plan.resolved_settings["tracking.uri"] = resolve_tracking_uri(base.tracking)
    plan.base = base
    _check_relaunch(plan)
    for dist in plan.distributions:
        for value in dist.probe_values():
            trial = plan.trial_config({dist.key: value}, _PROBE_NAME, base.storage.path)
            try:  # the store and the MLflow products were checked with the base
                preflight("stage2", trial, working_dir=working_dir, launch_dir=launch_dir, check_tracking=False,
                          check_relaunch=False)
            except PreflightError as err:
                raise PreflightError(err.setting, f"in a trial with search space '{dist.key}' = {value!r}: "
                                     f"{str(err).split(': ', 1)[-1]}", err.exit_code == 1) from None


def _check_relaunch(plan: SearchPlan) -> None:
    from perceive_ir.search.tracking import relaunch_changes

    run_id, changed = relaunch_changes(plan)
    if not changed:
        return
    raise PreflightError("name", f"a search named '{plan.cfg.name}' (MLflow run {run_id}) ran with other settings "
                         f"({describe_changes(changed, 8)}), and a relaunch under its name continues its trials and scheduler: give "
                         f"this search another name to start a new one, or keep those settings to continue it")
