"""Build and run the Ray Train ``TorchTrainer`` of a job: scaling, storage, failures, checkpoints, naming."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Optional

from perceive_ir.config import flatten, to_dict
from perceive_ir.data.pipeline import LoaderConfig, SourceShare, format_shares, source_shares
from perceive_ir.data.storage import redact
from perceive_ir.orchestration.config import JobConfig
from perceive_ir.orchestration.ray_runtime import connect
from perceive_ir.orchestration.staging import stage_products
from perceive_ir.orchestration.storage import run_storage
from perceive_ir.orchestration.world_size_plot import log_world_size_plot
from perceive_ir.registry.lineage import product_lineage, registered_from_run, shard_manifest_tags, upstream_tags
from perceive_ir.registry.registration import download_run_product, register_product
from perceive_ir.tracking import RunTracker, find_or_create_run, version_tags

log = logging.getLogger(__name__)

__all__ = ["build_trainer", "launch", "report_source_shares", "JobResult"]

def build_trainer(cfg: JobConfig, payload: dict[str, Any], callbacks: Optional[list] = None):
    """``callbacks``: extra Ray Train callbacks of the run (e.g. reporting to an enclosing Tune trial)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from perceive_ir.orchestration.worker import train_worker

    storage_path, filesystem = run_storage(cfg.storage)
    resources = dict(cfg.ray.resources_per_worker)
    payload["threads_per_worker"] = max(1, int(resources.get("CPU", 1)))
    return TorchTrainer(
        train_worker,
        train_loop_config=payload,
        scaling_config=ScalingConfig(num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu,
                                     resources_per_worker=resources,
                                     elastic_resize_monitor_interval_s=cfg.ray.resize_check_s),
        run_config=RunConfig(
            name=cfg.name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            failure_config=FailureConfig(max_failures=cfg.storage.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.storage.keep_last),
            callbacks=list(callbacks or []),
        ),
    )


SHARES_ARTIFACT = "data/source_shares.json"


def report_source_shares(cfg: JobConfig, tracker: RunTracker, working_dir: Optional[Path] = None) -> list[SourceShare]:
    """Each training source's share of the samples: logged as a table at start and kept in the run
    (a stage-1 phase that mixes the sources its own way gets a table of its own,
    ``data/source_shares_<phase>.json``). Relative local locations are read from ``working_dir``, the
    folder the workers run in."""
    shares = _log_shares(cfg.data.train, tracker, working_dir, SHARES_ARTIFACT)
    for phase in getattr(cfg, "loader_phases", list)():
        if phase.loader.weighting != cfg.data.train.weighting:
            _log_shares(phase.loader, tracker, working_dir, SHARES_ARTIFACT.replace(".json", f"_{phase.name}.json"),
                        f"{phase.name} phase: ")
    return shares


def _log_shares(loader: LoaderConfig, tracker: RunTracker, working_dir: Optional[Path], artifact: str,
                heading: str = "") -> list[SourceShare]:
    weighting = loader.weighting
    if working_dir is not None:
        loader = dataclasses.replace(loader, sources=[
            dataclasses.replace(s, location=str(working_dir / s.location), name=s.name or s.location)
            if "://" not in s.location and not Path(s.location).is_absolute() else s
            for s in loader.sources])
    shares = source_shares(loader)
    log.info("%s%s", heading, format_shares(shares, weighting))
    tracker.log_table({"source": [s.name for s in shares], "samples": [s.samples for s in shares],
                       "weight": [s.weight for s in shares], "share": [s.share for s in shares],
                       "weighting": [weighting] * len(shares)}, artifact)
    return shares


PRODUCTS = {"stage1": ("perceiver", "medium_tier"), "stage2": ("restorer",)}


def register_products(stage: str, cfg: JobConfig, tracker: RunTracker, *, search_run: Optional[str] = None,
                      extra_tags: Optional[dict[str, str]] = None, register_as: Optional[str] = None) -> dict[str, str]:
    """Register the stage's products as MLflow models, versions of ``<register_as>-<product>`` with
    their lineage as tags (``search_run``: the Ray Tune search the run came from; ``register_as``:
    instead of the config's, which a trial trains without); returns their URIs."""
    register_as = register_as or cfg.tracking.register_as
    run_tags = tracker.client.get_run(tracker.run_id).data.tags
    try:
        shards = shard_manifest_tags(cfg.data.train.sources, cfg.data.train.storage_options)
    except Exception as err:  # noqa: BLE001 - a manifest gone since training must not lose the products
        log.warning("shard manifests unreadable at registration: %s", err)
        shards = {"lineage.shard_manifests_sha256": "unknown"}
    upstream: dict[str, str] = {}
    for key in ("perceiver", "medium_tier"):  # stage 2's inputs (stage 1 may reuse a medium tier)
        location = getattr(cfg, key, None)
        if isinstance(location, str) and location:
            upstream.update(upstream_tags(key, location, tracker.uri))
    uris: dict[str, str] = {}
    for product in sorted(PRODUCTS[stage], key=lambda p: p != "medium_tier"):  # a perceiver names its medium tier
        done = registered_from_run(tracker.uri, tracker.run_id, product)
        if done is not None:  # a relaunch of a finished run registers nothing new
            uris[product] = f"models:/{done.name}/{done.version}"
            continue
        if product == "perceiver" and "medium_tier" in uris:
            upstream.update(upstream_tags("medium_tier", uris["medium_tier"], tracker.uri))
        folder = download_run_product(tracker.uri, tracker.run_id, product)
        tags = product_lineage(product, folder, run_tags, tracker.run_id, to_dict(cfg), shards, upstream,
                                        search_run) | dict(extra_tags or {})
        uris[product] = register_product(tracker.uri, tracker.run_id, folder,
                                         f"{register_as}-{product.replace('_', '-')}", tags,
                                         alias=cfg.tracking.register_alias)
        log.info("%s registered as %s", product, uris[product])
    return uris


class JobResult:
    def __init__(self, run_id: str, tracking_uri: str, result: Any) -> None:
        self.run_id, self.tracking_uri, self.result = run_id, tracking_uri, result


def launch(stage: str, cfg: JobConfig, working_dir: Optional[Path] = None, *, callbacks: Optional[list] = None,
           run_tags: Optional[dict[str, str]] = None, run_params: Optional[dict[str, Any]] = None) -> JobResult:
    """Find or create the job's MLflow run, then train under Ray; returns the run id.

    ``run_tags``/``run_params`` are added to the run when it is created (e.g. ``mlflow.parentRunId``
    and the values a search sampled); ``callbacks`` go to the Ray Train run."""
    import tempfile

    import yaml

    connect(cfg.ray, working_dir)
    params = {**flatten(cfg), **(run_params or {})}
    tags = {**version_tags(), **(run_tags or {})}
    tracking_uri, run_id, created = find_or_create_run(cfg.tracking, cfg.name, params, tags, stage)
    tracker = RunTracker(tracking_uri, run_id)
    with tempfile.TemporaryDirectory() as folder:
        resolved = Path(folder) / f"{stage}_resolved.yaml"
        resolved.write_text(yaml.safe_dump(redact(to_dict(cfg)), sort_keys=False))  # no credentials
        tracker.log_file(resolved, "config")
    log.info("%s: MLflow run %s (%s)", cfg.name, run_id, "new" if created else "continued")
    report_source_shares(cfg, tracker, working_dir)
    storage_path, filesystem = run_storage(cfg.storage)
    staged = stage_products(cfg, tracking_uri, storage_path, filesystem)  # workers never ask MLflow for them
    payload = {"stage": stage, "config": to_dict(cfg), "tracking_uri": tracking_uri, "run_id": run_id,
               "staged": staged}
    trainer = build_trainer(cfg, payload, callbacks)
    try:
        result = trainer.fit()
    except Exception:
        tracker.finish("FAILED")
        raise
    log_world_size_plot(tracker)
    stopped_early = cfg.loop.stop_after_steps is not None and cfg.loop.stop_after_steps < cfg.loop.max_steps
    if cfg.tracking.register_as and not stopped_early:
        register_products(stage, cfg, tracker)
    tracker.finish("KILLED" if stopped_early else "FINISHED")
    return JobResult(run_id, tracking_uri, result)
