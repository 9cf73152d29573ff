"""A restoration job: every image below ``input`` restored by the champion into ``output``, on Ray Data.

    result = run_restoration(load_config(RestoreConfig, "configs/restore.yaml",
                                         ["model=models:/quickstart-restorer@champion", "input=photos", "output=restored"]))

Order: pre-flight (the input lists images, the output takes a write, the target exists, the model is a
restorer and the perceiver a perceiver; nothing is loaded before these pass), then the records
already under the output say what is done, then Ray Data streams the rest through reading + decoding
(tasks), restoration (a pool of actors) and encoding + writing (tasks), with at most
``ray.in_flight_mb`` of pixels queued between the stages. The report (Parquet, CSV, histograms,
summary) goes to ``<output>/_restore/`` and to an MLflow run tagged with the model version.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from perceive_ir.config import flatten
from perceive_ir.data.storage import filesystem, join, storage_error
from perceive_ir.orchestration.preflight import PreflightError
from perceive_ir.workflows.restoration.config import STATE_FOLDER, RestoreConfig
from perceive_ir.workflows.restoration.models import ResolvedModels, resolve_models
from perceive_ir.workflows.restoration.records import done_paths, list_images, output_sizes, read_records

log = logging.getLogger(__name__)

__all__ = ["Plan", "RestorationResult", "plan_restoration", "run_restoration", "format_result", "MIB"]

MIB = 1 << 20


@dataclass
class Plan:
    """What pre-flight found: the images, those already done, the models."""

    images: dict[str, int]  # relative path -> input bytes
    done: set[str]
    models: ResolvedModels
    tracking_uri: str

    @property
    def todo(self) -> list[str]:
        return [p for p in self.images if p not in self.done]


@dataclass
class RestorationResult:
    output: str
    report: Any  # pandas table, one row per image
    summary: dict[str, Any]
    files: dict[str, str]  # report file -> URL
    run_id: str
    tracking_uri: str
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)


def _message(err: BaseException) -> str:
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def _check_output(cfg: RestoreConfig) -> None:
    """The output takes a write (a probe file, removed), before any model is touched."""
    probe = join(cfg.output, STATE_FOLDER, f".probe-{uuid.uuid4().hex}")
    try:
        fs, path = filesystem(probe, cfg.storage_options)
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        fs.pipe_file(path, b"")
        fs.rm_file(path)
    except Exception as err:  # noqa: BLE001 - local, S3 and other stores alike: one line
        raise PreflightError("output", f"'{cfg.output}' cannot be written: {_message(storage_error(probe, err, 'write'))}",
                             unreachable="unreachable" in type(err).__name__.lower()) from None


def _absolute_paths(cfg: RestoreConfig, working_dir: Optional[Path]) -> None:
    """Local folders -> absolute paths (the workers run in another folder); refused where the workers
    cannot read this machine's files (a remote cluster)."""
    import os

    from perceive_ir.orchestration.preflight import placement

    where = placement(cfg, working_dir)  # reads cfg.ray.address only
    for key in ("input", "output", "target"):
        value = getattr(cfg, key)
        if not value or "://" in value:
            continue
        if where.remote and not (where.in_job and os.path.isabs(value)):
            raise PreflightError(key, f"'{value}' is a folder of this machine, but {where.remote}; give a storage "
                                      "URL every node reaches (s3://bucket/prefix)")
        setattr(cfg, key, os.path.abspath(os.path.expanduser(value)))


def plan_restoration(cfg: RestoreConfig, working_dir: Optional[Path] = None) -> Plan:
    """Pre-flight of every input of the job, then what is left to do; :class:`PreflightError` naming
    the setting. Starts no Ray and loads no network."""
    from perceive_ir.tracking import resolve_tracking_uri

    for key in ("input", "output"):
        if not getattr(cfg, key):
            raise PreflightError(key, f"not set: {key}=<folder or URL>")
    _absolute_paths(cfg, working_dir)
    try:
        images = list_images(cfg.input, cfg.storage_options, skip=cfg.output)
    except (FileNotFoundError, OSError) as err:
        raise PreflightError("input", _message(err)) from None
    if not images:
        raise PreflightError("input", f"'{cfg.input}' holds no image ({', '.join(_extensions())})")
    _check_output(cfg)
    if cfg.target:
        fs, path = filesystem(cfg.target, cfg.storage_options)
        if not fs.exists(path):
            raise PreflightError("target", f"'{cfg.target}' does not exist")
    tracking_uri = resolve_tracking_uri(cfg.tracking)
    models = resolve_models(cfg.model, cfg.perceiver, tracking_uri)
    done = done_paths(read_records(cfg.output, cfg.storage_options), output_sizes(cfg.output, cfg.storage_options))
    return Plan(images, done & set(images), models, tracking_uri)


def _extensions() -> list[str]:
    from perceive_ir.data.images import IMAGE_EXTENSIONS

    return list(IMAGE_EXTENSIONS)


def _actor_cpus(cfg: RestoreConfig) -> float:
    """CPUs per actor: asked for, but never more than leaves room for the reading and writing tasks."""
    import ray

    total = ray.cluster_resources().get("CPU", cfg.ray.actor_cpus * cfg.ray.actors + 1)
    return max(0.25, min(cfg.ray.actor_cpus, (total - 0.5) / cfg.ray.actors))


def restored_dataset(cfg: RestoreConfig, plan: Plan):
    """The streaming pipeline over the images left to do (a Ray Data dataset, not yet run)."""
    import ray
    from ray.data import DataContext

    from perceive_ir.config import to_dict
    from perceive_ir.workflows.restoration.stages import encode_and_write, folder_files, read_and_decode

    context = DataContext.get_current()
    limits = context.execution_options.resource_limits
    context.execution_options.resource_limits = limits.copy(object_store_memory=cfg.ray.in_flight_mb * MIB)
    context.enable_progress_bars = False  # the job's own bar
    context.print_on_execution_start = False
    todo = plan.todo
    cpus = _actor_cpus(cfg)
    models = plan.models
    restorer = ray.put(folder_files(models.restorer))
    perceiver = ray.put(folder_files(models.perceiver)) if models.perceiver is not None else None
    options = dict(cfg.storage_options)
    ds = ray.data.from_items([{"path": p} for p in todo],
                             override_num_blocks=max(1, min(len(todo), math.ceil(len(todo) / cfg.decode_batch))))
    ds = ds.map_batches(read_and_decode, batch_size=cfg.decode_batch, batch_format="numpy", num_cpus=0.25,
                        fn_kwargs={"input": cfg.input, "target": cfg.target, "options": options})
    ds = ds.map_batches(_Restorer, batch_size=cfg.batch_images, batch_format="numpy",
                        compute=ray.data.ActorPoolStrategy(size=cfg.ray.actors),
                        num_cpus=cpus, num_gpus=1 if cfg.ray.use_gpu else 0,
                        fn_constructor_kwargs={"restorer": restorer, "perceiver": perceiver,
                                               "inference": to_dict(cfg.inference), "batch_pixels": cfg.batch_pixels,
                                               "threads": int(math.ceil(cpus))})
    return ds.map_batches(encode_and_write, batch_size=cfg.batch_images, batch_format="numpy", num_cpus=0.25,
                          fn_kwargs={"output": cfg.output, "options": options, "jpeg_quality": cfg.jpeg_quality,
                                     "webp_quality": cfg.webp_quality})


class _Restorer:
    """The actor Ray Data builds: the product files come as object references."""

    def __init__(self, restorer, perceiver, **kwargs) -> None:
        import ray

        from perceive_ir.workflows.restoration.stages import RestoreActor

        files = ray.get(restorer)
        scorer = ray.get(perceiver) if perceiver is not None else None
        self.actor = RestoreActor(files, scorer, **kwargs)

    def __call__(self, batch):
        return self.actor(batch)


def _stream(cfg: RestoreConfig, plan: Plan) -> dict[str, Any]:
    """Run the pipeline; this launch's counts and images/s."""
    from tqdm import tqdm

    todo = plan.todo
    counts = {"restored": 0, "skipped": 0}
    start = time.perf_counter()
    if todo:
        ds = restored_dataset(cfg, plan)
        with tqdm(total=len(todo), desc="restore", unit="img", disable=not cfg.progress) as bar:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                for status in batch["status"]:
                    counts[str(status)] = counts.get(str(status), 0) + 1
                bar.update(len(batch["status"]))
    elapsed = time.perf_counter() - start
    return {"launch_images": len(todo), "launch_restored": counts["restored"], "launch_skipped": counts["skipped"],
            "launch_seconds": elapsed, "already_done": len(plan.done),
            "images_per_s": counts["restored"] / elapsed if todo and elapsed > 0 else float("nan")}


def run_restoration(cfg: RestoreConfig, working_dir: Optional[Path] = None, plan: Optional[Plan] = None
                    ) -> RestorationResult:
    from perceive_ir.orchestration.config import RaySettings
    from perceive_ir.orchestration.ray_runtime import connect
    from perceive_ir.tracking import RunTracker, find_or_create_run, version_tags
    from perceive_ir.workflows.restoration.report import summarize, write_report

    plan = plan or plan_restoration(cfg)
    if plan.todo:
        connect(RaySettings(address=cfg.ray.address, num_workers=cfg.ray.actors, local_cpus=cfg.ray.local_cpus),
                working_dir)
    launch = _stream(cfg, plan)
    records = read_records(cfg.output, cfg.storage_options)
    report = records[records["path"].isin(set(plan.images))].reset_index(drop=True)
    summary = summarize(report, launch)
    name = cfg.run_name or f"restore-{cfg.output.rstrip('/').rsplit('/', 1)[-1] or 'output'}"
    tags = {"job": "restore", **plan.models.version_tags, **version_tags()}
    _, run_id, _ = find_or_create_run(cfg.tracking, name, flatten(cfg), tags, "restore")
    with tempfile.TemporaryDirectory(prefix="restore-report-") as local:
        files = write_report(report, summary, cfg.output, cfg.storage_options, Path(local),
                             f"{cfg.model} on {cfg.input}")
        tracker = RunTracker(plan.tracking_uri, run_id)
        tracker.set_tags({k: v for k, v in tags.items() if k.startswith("restore.")})
        tracker.log_metrics({f"restore/{k}": float(v) for k, v in summary.items()
                             if isinstance(v, (int, float)) and math.isfinite(float(v))}, step=0)
        tracker.log_folder(local, "restoration")
        tracker.finish("FINISHED")
    skipped = report[report["status"] == "skipped"]
    return RestorationResult(cfg.output, report, summary, files, run_id, plan.tracking_uri,
                             list(zip(skipped["path"], skipped["reason"])))


def format_result(result: RestorationResult) -> str:
    s = result.summary
    lines = [f"restored:   {s['restored']} of {s['images']} images in {result.output} "
             f"({s['launch_restored']} now, {s['already_done']} already done, {s['skipped']} skipped)"]
    if math.isfinite(s.get("images_per_s", float("nan"))):
        lines.append(f"throughput: {s['images_per_s']:.2f} images/s over {s['launch_seconds']:.1f} s")
    if math.isfinite(s["quality_in_mean"]):
        lines.append(f"quality:    perceiver score {s['quality_in_mean']:.3f} -> {s['quality_out_mean']:.3f} (mean); "
                     f"{s['flagged']} outputs scored below their input ({s['flagged_share']:.1%})")
    if math.isfinite(s["psnr_in_mean"]):
        lines.append(f"reference:  PSNR {s['psnr_in_mean']:.2f} -> {s['psnr_out_mean']:.2f} dB, "
                     f"SSIM {s['ssim_in_mean']:.4f} -> {s['ssim_out_mean']:.4f}")
    for path, reason in result.skipped[:20]:
        lines.append(f"skipped:    {path}: {reason}")
    if len(result.skipped) > 20:
        lines.append(f"skipped:    ... and {len(result.skipped) - 20} more (the report lists them)")
    lines.append(f"report:     {', '.join(result.files.values())}")
    lines.append(f"MLflow:     restoration run {result.run_id} ({result.tracking_uri})")
    return "\n".join(lines)
