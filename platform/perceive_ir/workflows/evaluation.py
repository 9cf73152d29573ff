"""The benchmark protocol: a restorer scored on a suite's full test images by Ray workers, reported and tracked.

    result = run_evaluation(load_config(EvalConfig, "configs/eval/quickstart.yaml", ["model=runs:/<id>/restorer"]))

Order: the suite's sets are found (a missing one fails here, naming it), then the model is
resolved, then Ray workers (actors, one per ``ray.num_workers``, each holding the restorer) score
chunks of images while the driver shows progress; the driver writes the table (markdown, CSV),
the severity curves and the best/worst grid, logs them to an MLflow evaluation run and, for a
registered model version, sets the headline metrics as tags on that version.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from perceive_ir.config import flatten, to_dict
from perceive_ir.eval.inference import InferenceConfig
from perceive_ir.eval.paper_table import PaperTable, PaperTableConfig, load_published, paper_table, resolve_published_path
from perceive_ir.eval.report import Row, by_type, headline, markdown_table, severity_plot, summarize, write_csv, write_records
from perceive_ir.eval.scoring import Record
from perceive_ir.eval.suite import Item, SuiteConfig, resolve_suite, suite_hash
from perceive_ir.orchestration.config import RaySettings
from perceive_ir.tracking import TrackingConfig

log = logging.getLogger(__name__)

CHUNK = 4  # images per call to a worker when inference.batch_size is left to the device

__all__ = ["MetricsConfig", "EvalConfig", "EvaluationResult", "run_evaluation", "format_result", "chunk_size",
           "chunk_items", "start_workers", "score_chunks"]


@dataclass
class MetricsConfig:
    y_channel: bool = False  # score the BT.601 luma instead of RGB


@dataclass
class EvalConfig(SuiteConfig):
    """A suite (name, sets, ...) plus how to run it; ``model`` is the restorer to score."""

    model: str = ""  # runs:/<id>/restorer, models:/<name>/<n>, models:/<name>@<alias>, or a folder
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    ray: RaySettings = field(default_factory=lambda: RaySettings(num_workers=1))
    tracking: TrackingConfig = field(default_factory=lambda: TrackingConfig(experiment="perceive-ir-eval"))
    output: str = "runs/eval"  # local folder of the reports (also logged to MLflow)
    grid_images: int = 3  # best and worst images each in the grid
    progress: bool = True
    paper_table: Optional[PaperTableConfig] = None  # the papers' table, published rows beside this model's

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.grid_images < 0:
            raise ValueError("grid_images must be >= 0")


@dataclass
class EvaluationResult:
    run_id: str
    tracking_uri: str
    suite_hash: str
    rows: list[Row]
    records: list[Record]
    headline: dict[str, float]
    per_type: dict[str, dict[str, float]]
    folder: Path
    table: str
    curves: Optional[Path]
    grid: Optional[Path]
    notes: list[str] = field(default_factory=list)
    version_tags: dict[str, str] = field(default_factory=dict)
    paper: Optional[PaperTable] = None


def chunk_size(inference: InferenceConfig) -> int:
    """Images per call to a worker: its batch, or :data:`CHUNK` when the worker's device picks the batch."""
    return inference.batch_size or CHUNK


def chunk_items(items: list[Item], size: int) -> list[list[Item]]:
    """Items sorted by set, degradation and image size, cut into chunks of one size where possible
    (image sizes from file headers; shard samples are grouped by size on the worker)."""
    from perceive_ir.eval.scoring import image_size

    def group(item: Item) -> tuple:
        return item.set, item.type, item.level, (0, 0) if item.shard else image_size(item)

    chunks: list[list[Item]] = []
    for item in sorted(items, key=lambda i: (group(i), i.image)):
        if chunks and len(chunks[-1]) < size and group(chunks[-1][0]) == group(item):
            chunks[-1].append(item)
        else:
            chunks.append([item])
    return chunks


def _product(location: str, tracking_uri: str) -> dict[str, Any]:
    """The restorer folder's files as bytes, for workers on any node."""
    from perceive_ir.products import resolve_product

    folder = resolve_product(location, "model", "model", tracking_uri)
    files = {name: folder / name for name in ("restorer.json", "model.safetensors")}
    missing = [name for name, path in files.items() if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"model '{location}' is not a restorer (no {', '.join(missing)} in '{folder}')")
    return {name: path.read_bytes() for name, path in files.items()}


def _resolve_model(cfg: EvalConfig, tracking_uri: str):
    """The model's MLflow reference and its files; a model not found names the tracking store asked
    and where that setting came from (and leaves no store behind)."""
    from perceive_ir.data.storage import is_unreachable, missing_store
    from perceive_ir.products.locations import URI_SCHEMES
    from perceive_ir.registry.evaluation_tags import model_reference
    from perceive_ir.tracking.mlflow_run import describe_store, tracking_source

    where = describe_store(tracking_uri, tracking_source(cfg.tracking))
    if cfg.model.startswith(URI_SCHEMES) and missing_store(tracking_uri):
        raise FileNotFoundError(f"model '{cfg.model}' cannot be resolved in {where}")
    try:
        return model_reference(cfg.model, tracking_uri), _product(cfg.model, tracking_uri)
    except Exception as err:  # noqa: BLE001 - MLflow raises several types; one line naming the store
        if not cfg.model.startswith(URI_SCHEMES):
            raise
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        if is_unreachable(err):
            raise ConnectionError(f"model '{cfg.model}': {where} does not answer: {message}") from None
        raise FileNotFoundError(f"model '{cfg.model}' cannot be resolved in {where}: {message}") from None


def _worker_class():
    import ray

    @ray.remote
    class EvalWorker:
        def __init__(self, product: dict[str, bytes], options: dict[str, Any], threads: int) -> None:
            import tempfile

            import torch

            from perceive_ir.eval.scoring import Scorer
            from perceive_ir.products import load_restorer

            torch.set_num_threads(max(1, threads))
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            with tempfile.TemporaryDirectory() as folder:
                for name, data in product.items():
                    (Path(folder) / name).write_bytes(data)
                model, _ = load_restorer(folder)
            model.eval().to(device)
            self.scorer = Scorer(model, InferenceConfig(**options["inference"]), options["seed"],
                                 options["quantize_input"], options["y_channel"], device)

        def score(self, items: list[Item]) -> list[Record]:
            return self.scorer.score(items)

        def images(self, items: list[Item]):
            return self.scorer.images(items)

    return EvalWorker


def start_workers(cfg: EvalConfig, product: dict[str, bytes]) -> list:
    import ray

    n = cfg.ray.max_workers
    cpus = float(cfg.ray.resources_per_worker.get("CPU", 1.0))
    # A local Ray may have fewer CPUs than asked for: never ask for more than a fair share.
    cpus = max(0.5, min(cpus, ray.cluster_resources().get("CPU", cpus) / n))
    options = {"inference": to_dict(cfg.inference), "seed": cfg.seed, "quantize_input": cfg.quantize_input,
               "y_channel": cfg.metrics.y_channel}
    extra = {k: v for k, v in cfg.ray.resources_per_worker.items() if k not in ("CPU", "GPU")}
    worker = _worker_class().options(num_cpus=cpus, num_gpus=1 if cfg.ray.use_gpu else 0, resources=extra or None)
    shared = ray.put(product)
    return [worker.remote(shared, options, int(math.ceil(cpus))) for _ in range(n)]


def score_chunks(workers: list, chunks: list[list[Item]], progress: bool) -> list[Record]:
    from ray.util import ActorPool
    from tqdm import tqdm

    records: list[Record] = []
    pool = ActorPool(workers)
    with tqdm(total=sum(len(c) for c in chunks), desc="evaluate", unit="img", disable=not progress) as bar:
        for result in pool.map_unordered(lambda worker, chunk: worker.score.remote(chunk), chunks):
            records += result
            bar.update(len(result))
    return records


def _best_and_worst(records: list[Record], items: list[Item], k: int) -> list[tuple[str, Item]]:
    by_key = {(i.set, i.type, i.level, i.image): i for i in items}
    scored = sorted((r for r in records if math.isfinite(r.psnr_out - r.psnr_in)),
                    key=lambda r: r.psnr_out - r.psnr_in, reverse=True)
    picks = [("best", r) for r in scored[:k]] + [("worst", r) for r in scored[::-1][:k]
                                                   if r not in scored[:k]]
    return [(f"{kind}: {r.set} / {r.type} {r.level} / {r.image}: PSNR {r.psnr_in:.2f} -> {r.psnr_out:.2f} dB "
             f"(degraded | restored | clean)", by_key[r.set, r.type, r.level, r.image]) for kind, r in picks]


def _write_reports(cfg: EvalConfig, rows: list[Row], records: list[Record], folder: Path, workers: list,
                   items: list[Item]) -> tuple[str, Optional[Path], Optional[Path]]:
    import ray
    import yaml

    from perceive_ir.eval.grid import save_comparison_grid

    folder.mkdir(parents=True, exist_ok=True)
    table = markdown_table(rows)
    (folder / "table.md").write_text(f"# {cfg.name}: {cfg.model}\n\n{table}")
    write_csv(rows, folder / "table.csv")
    write_records(records, folder / "per_image.csv")
    (folder / "suite.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    curves = severity_plot(rows, folder / "severity_curves.png", title=f"{cfg.name}: {cfg.model}")
    grid = None
    picks = _best_and_worst(records, items, cfg.grid_images)
    if picks:
        images = ray.get(workers[0].images.remote([item for _, item in picks]))
        grid = save_comparison_grid(folder / "best_worst.png", [(label, tiles) for (label, _), tiles in zip(picks, images)])
    return table, curves, grid


def _metric_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in text)


def _metrics(rows: list[Row], per_type: dict[str, dict[str, float]], mean: dict[str, float]) -> dict[str, float]:
    metrics = {f"eval/average/{m}": v for m, v in mean.items()}
    for r in rows:
        for m in ("psnr_in", "psnr_out", "ssim_in", "ssim_out"):
            metrics[_metric_name(f"eval/{r.set}/{r.type}/{r.level or 'test'}/{m}")] = getattr(r, m)
    for kind, values in per_type.items():
        metrics.update({_metric_name(f"eval/type/{kind}/{m}"): v for m, v in values.items()})
    return {k: v for k, v in metrics.items() if math.isfinite(v)}


def run_evaluation(cfg: EvalConfig, working_dir: Optional[Path] = None) -> EvaluationResult:
    import ray

    from perceive_ir.orchestration.ray_runtime import connect
    from perceive_ir.tracking import RunTracker, find_or_create_run, resolve_tracking_uri, version_tags
    from perceive_ir.registry.evaluation_tags import tag_model_version

    if not cfg.model:
        raise ValueError("no model to evaluate: set model=<runs:/<id>/restorer | models:/<name>/<n> | folder>")
    used, items, notes = resolve_suite(cfg)  # fails on a missing set before the model is touched
    digest = suite_hash(cfg, used, items, cfg.metrics.y_channel)
    published = None
    if cfg.paper_table is not None:  # checked against the suite before the model is touched
        published = load_published(resolve_published_path(cfg.paper_table.published, working_dir), cfg.paper_table,
                                   [(i.set, i.type, i.level) for i in items])
    for note in notes:
        log.warning("%s", note)
    tracking_uri = resolve_tracking_uri(cfg.tracking)
    ref, product = _resolve_model(cfg, tracking_uri)
    connect(cfg.ray, working_dir)
    start = time.perf_counter()
    workers = start_workers(cfg, product)
    try:
        records = score_chunks(workers, chunk_items(items, chunk_size(cfg.inference)), cfg.progress)
        elapsed = time.perf_counter() - start
        order = list(dict.fromkeys((i.set, i.type, i.level) for i in items))
        rows = summarize(records, order)
        mean, per_type = headline(rows), by_type(rows)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        folder = Path(cfg.output) / f"{cfg.name}-{stamp}"
        table, curves, grid = _write_reports(cfg, rows, records, folder, workers, items)
        paper = None
        if published is not None:
            paper = paper_table(rows, cfg.paper_table, published, cfg.model)
            (folder / "paper_table.md").write_text(f"# {cfg.name}: {cfg.model}\n\n{paper.markdown()}")
            paper.write_csv(folder / "paper_table.csv")
    finally:
        for worker in workers:
            ray.kill(worker)
    tags = {"job": "evaluate", "eval.suite": cfg.name, "eval.suite_hash": digest, **ref.tags(), **version_tags()}
    _, run_id, _ = find_or_create_run(cfg.tracking, f"eval-{cfg.name}-{stamp}", flatten(cfg), tags, "evaluate")
    tracker = RunTracker(tracking_uri, run_id)
    tracker.log_metrics(_metrics(rows, per_type, mean) | {"eval/images_per_s": len(records) / elapsed}
                        | (paper.metrics() if paper else {}), step=0)
    tracker.log_folder(folder, "evaluation")
    tracker.finish("FINISHED")
    version_tags_set = tag_model_version(ref, tracking_uri, cfg.name, {f"{k}": v for k, v in mean.items()},
                                         {"suite_hash": digest, "run_id": run_id})
    return EvaluationResult(run_id, tracking_uri, digest, rows, records, mean, per_type, folder, table, curves, grid,
                            notes, version_tags_set, paper)


def format_result(result: EvaluationResult) -> str:
    """What an evaluation prints: notes, the table, per-type headline, where the reports are."""
    lines = [f"note: {note}" for note in result.notes]
    lines.append(result.table)
    lines.append("per type:   " + "; ".join(f"{t} {v['psnr_in']:.2f} -> {v['psnr_out']:.2f} dB"
                                            for t, v in result.per_type.items()))
    if result.paper:
        lines.append(result.paper.markdown())
    lines.append(f"reports:    {result.folder} (table.md, table.csv, per_image.csv"
                 + (", paper_table.md, paper_table.csv)" if result.paper else ")"))
    if result.curves:
        lines.append(f"curves:     {result.curves}")
    if result.grid:
        lines.append(f"best/worst: {result.grid}")
    lines.append(f"MLflow:     evaluation run {result.run_id} ({result.tracking_uri}), suite hash {result.suite_hash}")
    if result.version_tags:
        lines.append(f"model version tagged: {', '.join(sorted(result.version_tags))}")
    return "\n".join(lines)
