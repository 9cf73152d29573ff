"""The quickstart pipeline on the local default: shards from real photos, verified, streamed,
then stage 1 and stage 2 trained on a local Ray with 2 CPU workers.

    python jobs/pipeline.py [--config configs/pipeline_local.yaml] [--endpoint-url URL] [key=value ...]

It copies the photos that ship inside scikit-image, scikit-learn and matplotlib into the
work folder, builds tiled WebDataset shards from them, verifies the shards against their
manifest and streams training batches (random crops and flips) with the loader, printing
throughput. It then runs the stage-1 job (hold-out restorers, perceiver prompts) and the
stage-2 job (the restorer with the quality-aware losses, taking the stage-1 products from
MLflow), and prints validation PSNR/SSIM per degradation type, input against output. The
products are registered as MLflow models (``quickstart-perceiver``, ``quickstart-medium-tier``,
``quickstart-restorer``) with their lineage. It ends with the benchmark protocol (jobs/evaluate.py)
on the registered stage-2 restorer: full test images of a small suite (configs/eval/quickstart.yaml),
its table and where the severity curves are; then the version goes through the promotion gates
(reusing that evaluation) and the pair becomes ``@champion``, and ``perceive-registry list`` is printed.
Files go under ``workdir`` (photos, shards, checkpoints, reports); runs and models go to the default
tracking store that every job and ``perceive-registry`` use, ``runs/mlflow.db`` in the folder it is
launched from (``tracking_uri=`` or MLFLOW_TRACKING_URI for another). It ends by printing the values
of the placeholders the documentation's next commands take (``<stage-1 run id>``, ...). Rerunning
reuses finished shards and finished runs.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from typing import Optional
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for entry in (REPO / "platform", REPO, REPO / "jobs"):  # run unchanged from a plain checkout (ray job submit)
    if str(entry) not in sys.path:
        sys.path.insert(0, str(entry))

from dataset_tools.build import BuildConfig, build_shards  # noqa: E402
from dataset_tools.sources import SourceSpec  # noqa: E402
from dataset_tools.verify import verify  # noqa: E402
from perceive_ir.config import ConfigError, load_config  # noqa: E402
from perceive_ir.data.package_photos import copy_photos  # noqa: E402
from perceive_ir.data.pipeline import LoaderConfig, ShardSourceConfig, build_loader  # noqa: E402
from perceive_ir.data.storage import add_endpoint_argument, join, set_default_endpoint  # noqa: E402


@dataclass
class PipelineConfig:
    workdir: str = "runs/quickstart"
    tile_size: int = 256
    tile_stride: int = 192
    build_workers: int = 2
    patch_size: int = 128
    batch_size: int = 8
    loader_workers: int = 2
    samples: int = 512  # streamed to measure the data path
    seed: int = 0
    train: bool = True  # run stage 1 and stage 2 after the data part
    stage1_config: str = "configs/stage1_tiny.yaml"
    stage2_config: str = "configs/stage2_tiny.yaml"
    run_prefix: str = "quickstart"  # run names: <prefix>-stage1, <prefix>-stage2 (a rerun continues them)
    train_overrides: list[str] = field(default_factory=list)  # key=value for both stage configs
    stage1_overrides: list[str] = field(default_factory=list)  # key=value for the stage-1 config only
    stage2_overrides: list[str] = field(default_factory=list)  # key=value for the stage-2 config only
    evaluate: bool = True  # score the stage-2 restorer on the evaluation suite after training
    eval_config: str = "configs/eval/quickstart.yaml"
    eval_overrides: list[str] = field(default_factory=list)  # key=value for the evaluation suite
    register_as: str = "quickstart"  # models <register_as>-perceiver, -medium-tier, -restorer; "": none
    promote: bool = True  # move @champion to the evaluated restorer when the promotion gates hold
    promotion_metric: str = "psnr_out"
    promotion_margin: float = 0.0
    tracking_uri: Optional[str] = None  # None: MLFLOW_TRACKING_URI, else the default store (runs/mlflow.db)


def run_data_stage(cfg: PipelineConfig) -> str:
    """Build (or reuse) and verify the shards; return their location."""
    photos = Path(cfg.workdir) / "photos"
    copied = copy_photos(photos)
    print(f"[1/3] {len(copied)} package photos in {photos}")
    shards = join(cfg.workdir, "shards")
    start = time.perf_counter()
    manifest = build_shards(BuildConfig(
        output=shards, sources=[SourceSpec("package_photos", str(photos))], tile_size=cfg.tile_size,
        tile_stride=cfg.tile_stride, max_samples_per_shard=64, workers=cfg.build_workers, seed=cfg.seed))
    print(f"      {manifest.total_samples} samples in {len(manifest.shards)} shards, "
          f"{manifest.total_bytes / 2**20:.1f} MiB, {time.perf_counter() - start:.1f} s")
    report = verify(shards)
    if not report.ok:
        raise RuntimeError("shard verification failed:\n" + "\n".join(report.problems))
    print(f"[2/3] verified {report.shards} shards, {report.samples} samples: checksums, counts, decoding")
    return shards


def stream(cfg: PipelineConfig, shards: str) -> None:
    loader_cfg = LoaderConfig(sources=[ShardSourceConfig(shards)], patch_size=cfg.patch_size,
                              batch_size=cfg.batch_size, samples_per_epoch=cfg.samples,
                              num_workers=cfg.loader_workers, seed=cfg.seed)
    start = time.perf_counter()
    seen = skipped = 0
    for batch in build_loader(loader_cfg):
        seen += batch["gt"].shape[0]
        skipped += batch["skipped"]
    elapsed = time.perf_counter() - start
    print(f"[3/3] streamed {seen} crops of {cfg.patch_size}x{cfg.patch_size} in {elapsed:.1f} s "
          f"({seen / elapsed:.0f} samples/s, {cfg.loader_workers} loader workers, worker start-up included); "
          f"{skipped} bad samples skipped")


def _stage_overrides(cfg: PipelineConfig, shards: str, stage: str) -> list[str]:
    workdir = Path(cfg.workdir).resolve()
    overrides = [
        f"name={cfg.run_prefix}-{stage}",
        f"data.train.sources=[{{location: {shards}}}]",
        f"storage.path={workdir / 'ray'}",
    ]
    if cfg.tracking_uri:
        overrides.append(f"tracking.uri={cfg.tracking_uri}")
    if cfg.register_as:
        overrides.append(f"tracking.register_as={cfg.register_as}")
    return overrides + list(cfg.train_overrides)


def checked_launch(stage: str, stage_cfg):
    """The stage's pre-flight, then its launch; the configs' relative paths are the repository's.
    A failed pre-flight ends the pipeline as jobs/stage1.py and jobs/stage2.py end: one line, exit 1 or 2."""
    from perceive_ir.orchestration.preflight import PreflightError, preflight
    from perceive_ir.orchestration.trainer import launch

    try:
        preflight(stage, stage_cfg, working_dir=REPO, launch_dir=REPO)
    except PreflightError as err:
        hint = " (here: another workdir=, or run_prefix=, starts new runs)" if err.setting == "name" else ""
        print(f"pipeline: {stage} pre-flight: {err}{hint}", file=sys.stderr)
        raise SystemExit(err.exit_code) from None
    return launch(stage, stage_cfg, working_dir=REPO)


def train(cfg: PipelineConfig, shards: str) -> None:
    """Stage 1 then stage 2 through the same pre-flight and launcher as jobs/stage1.py and jobs/stage2.py."""
    from perceive_ir.orchestration.config import Stage1Config, Stage2Config

    shards = str(Path(shards).resolve()) if "://" not in shards else shards
    start = time.perf_counter()
    stage1_cfg = load_config(Stage1Config, REPO / cfg.stage1_config,
                             _stage_overrides(cfg, shards, "stage1") + list(cfg.stage1_overrides))
    stage1 = checked_launch("stage1", stage1_cfg)
    print(f"[4/5] stage 1: {stage1_cfg.loop.max_steps} steps on {stage1_cfg.ray.num_workers} Ray workers in "
          f"{time.perf_counter() - start:.0f} s; MLflow run {stage1.run_id} ({stage1.tracking_uri})")
    start = time.perf_counter()
    stage2_cfg = load_config(Stage2Config, REPO / cfg.stage2_config, _stage_overrides(cfg, shards, "stage2") + [
        f"perceiver=runs:/{stage1.run_id}/perceiver", f"medium_tier=runs:/{stage1.run_id}/medium_tier",
        *cfg.stage2_overrides])
    stage2 = checked_launch("stage2", stage2_cfg)
    print(f"[5/5] stage 2: {stage2_cfg.loop.max_steps} steps in {time.perf_counter() - start:.0f} s; "
          f"MLflow run {stage2.run_id}")
    print_validation_table(stage2.tracking_uri, stage2.run_id, stage2_cfg.data.validation.types)
    try:
        if cfg.evaluate:
            evaluate_and_promote(cfg, stage2)
    finally:
        print_placeholders(stage1.run_id, stage2.run_id, stage2.tracking_uri)


def evaluate_and_promote(cfg: PipelineConfig, stage2) -> None:
    from perceive_ir.registry.lineage import registered_from_run

    version = registered_from_run(stage2.tracking_uri, stage2.run_id, "restorer") if cfg.register_as else None
    model = f"models:/{version.name}/{version.version}" if version else f"runs:/{stage2.run_id}/restorer"
    overrides = evaluate(cfg, stage2.tracking_uri, model)
    if version is not None and cfg.promote:
        promote_and_list(cfg, stage2.tracking_uri, version.name, str(version.version), overrides)


PLACEHOLDERS = ("<stage-1 run id>", "<stage-2 run id>")


def print_placeholders(stage1_run: str, stage2_run: str, tracking_uri: str) -> None:
    """The values of the placeholders in the documentation's commands, one per line."""
    print(f"\nFor the next commands of the README and docs/ (tracking store {tracking_uri}):")
    for name, value in zip(PLACEHOLDERS, (stage1_run, stage2_run)):
        print(f"  {name} = {value}")


def _eval_overrides(cfg: PipelineConfig) -> list[str]:
    from perceive_ir.workflows.evaluation import EvalConfig

    data_root = load_config(EvalConfig, REPO / cfg.eval_config, cfg.eval_overrides).data_root
    if "://" not in data_root and not Path(data_root).is_absolute():
        data_root = str(REPO / data_root)  # the suite's datasets sit beside the repository
    return [f"output={Path(cfg.workdir).resolve() / 'eval'}", *cfg.eval_overrides, f"data_root={data_root}"]


def evaluate(cfg: PipelineConfig, tracking_uri: str, model: str) -> list[str]:
    """The stage-2 restorer on the quickstart suite, as jobs/evaluate.py would score it; returns the
    suite overrides used (a promotion on the same suite reuses this evaluation)."""
    from perceive_ir.workflows.evaluation import EvalConfig, format_result, run_evaluation

    overrides = _eval_overrides(cfg)
    eval_cfg = load_config(EvalConfig, REPO / cfg.eval_config,
                           [f"model={model}", f"tracking.uri={tracking_uri}", *overrides])
    start = time.perf_counter()
    result = run_evaluation(eval_cfg, working_dir=REPO)
    print(f"\nEvaluation of the stage-2 restorer on suite '{eval_cfg.name}' (full images, fp32, "
          f"{len(result.records)} images in {time.perf_counter() - start:.0f} s):")
    print(format_result(result))
    return overrides


def promote_and_list(cfg: PipelineConfig, tracking_uri: str, name: str, version: str, overrides: list[str]) -> None:
    """The restorer version through the promotion gates, then the registry as ``perceive-registry list`` shows it."""
    from perceive_ir.workflows.promotion import Gates, PromotionRefused, promote
    from perceive_ir.workflows.registry_cli import list_versions

    gates = Gates(cfg.promotion_metric, cfg.promotion_margin)
    try:
        done = promote(name, version, REPO / cfg.eval_config, tracking_uri, gates, overrides, working_dir=REPO)
        print(f"\nPromoted {name} v{version} to @champion ({done.suite}/{gates.metric} {done.candidate_score:.4f}; "
              f"@champion now: {', '.join(f'{n} v{v}' for n, v in done.moved.items())})")
    except PromotionRefused as err:
        print(f"\nPromotion refused: {err}")
    print(f"\n$ perceive-registry --tracking-uri {tracking_uri} list")
    print(list_versions(tracking_uri))


def print_validation_table(tracking_uri: str, run_id: str, types: list[str]) -> None:
    from mlflow.tracking import MlflowClient

    metrics = MlflowClient(tracking_uri=tracking_uri).get_run(run_id).data.metrics
    header = f"{'degradation':<16} {'PSNR in':>8} {'PSNR out':>9} {'SSIM in':>8} {'SSIM out':>9}"
    print("\nValidation (fixed held-out crops, last validation of stage 2):")
    print(header)
    print("-" * len(header))
    for name in [*types, "mean"]:
        values = [metrics.get(f"val/{name}/{k}", float("nan")) for k in ("psnr_in", "psnr_out", "ssim_in", "ssim_out")]
        print(f"{name:<16} {values[0]:>8.2f} {values[1]:>9.2f} {values[2]:>8.3f} {values[3]:>9.3f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file (default: built-in local profile)")
    parser.add_argument("overrides", nargs="*", help="key=value settings")
    add_endpoint_argument(parser)
    args = parser.parse_args(argv)
    set_default_endpoint(args.endpoint_url)
    try:
        cfg = load_config(PipelineConfig, args.config, args.overrides)
    except ConfigError as err:
        print(f"pipeline: configuration error: {err}", file=sys.stderr)
        return 2
    shards = run_data_stage(cfg)
    stream(cfg, shards)
    if cfg.train:
        train(cfg, shards)
    return 0


if __name__ == "__main__":
    sys.exit(main())
