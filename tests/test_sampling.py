"""Source mixture: ``replicate`` (weights are replication factors of each dataset, the paper's
resampling ratios) against ``probability`` (weights are the shares) and ``balanced`` (equal shares,
stage 1's prompt phase), on built shard sets of different sizes; the start-up table and its MLflow
copy, one per stage-1 phase that mixes the sources its own way."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest

from dataset_tools.build import BuildConfig, build_shards
from dataset_tools.sources import SourceSpec
from perceive_ir.config import load_config
from perceive_ir.data.pipeline import LoaderConfig, ShardSourceConfig, build_loader, format_shares, source_shares
from perceive_ir.orchestration.config import Stage1Config
from perceive_ir.orchestration.trainer import SHARES_ARTIFACT, report_source_shares
from perceive_ir.tracking import RunTracker, TrackingConfig, find_or_create_run
from test_shards import small_photos

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sized_sets(package_photos, tmp_path_factory) -> dict[str, Path]:
    """A large set (overlapping tiles of two photos) and a small one (three whole photos)."""
    root = tmp_path_factory.mktemp("sized")
    photos = sorted(small_photos(package_photos, root / "photos", n=5).iterdir())
    for name, chosen in (("big", photos[:2]), ("small", photos[2:5])):
        (root / name).mkdir()
        for p in chosen:
            (root / name / p.name).write_bytes(p.read_bytes())
    sets = {}
    for name, tiles in (("big", dict(tile_size=40, tile_stride=16)), ("small", {})):
        build_shards(BuildConfig(output=str(root / f"{name}_shards"), sources=[SourceSpec(name, str(root / name))],
                                 max_samples_per_shard=5, progress=False, **tiles))
        sets[name] = root / f"{name}_shards"
    return sets


def _loader(sets, weighting: str, **kw) -> LoaderConfig:
    sources = [ShardSourceConfig(str(sets["big"]), weight=1.0, name="big"),
               ShardSourceConfig(str(sets["small"]), weight=6.0, name="small")]
    settings = dict(patch_size=32, batch_size=16, samples_per_epoch=1600, num_workers=0, shuffle_buffer=16)
    settings.update(kw)
    return LoaderConfig(sources=sources, weighting=weighting, **settings)


def _manifest_total(folder: Path) -> int:
    return json.loads((folder / "manifest.json").read_text())["totals"]["samples"]


def test_replicate_shares_are_weight_times_size(sized_sets):
    big, small = _manifest_total(sized_sets["big"]), _manifest_total(sized_sets["small"])
    assert small == 3 and big > 6 * small  # sizes that make the two modes far apart
    shares = source_shares(_loader(sized_sets, "replicate"))
    assert [(s.name, s.samples, s.weight) for s in shares] == [("big", big, 1.0), ("small", small, 6.0)]
    assert shares[0].share == pytest.approx(big / (big + 6 * small))
    assert shares[1].share == pytest.approx(6 * small / (big + 6 * small))
    probability = source_shares(_loader(sized_sets, "probability"))
    assert [s.share for s in probability] == pytest.approx([1 / 7, 6 / 7])
    assert [s.share for s in source_shares(_loader(sized_sets, "balanced"))] == [0.5, 0.5]


@pytest.mark.parametrize("weighting", ["replicate", "probability", "balanced"])
def test_streamed_source_frequency_matches_the_shares(sized_sets, weighting):
    cfg = _loader(sized_sets, weighting)
    expected = {s.name: s.share for s in source_shares(cfg)}
    datasets = [d for batch in build_loader(cfg) for d in batch["dataset"]]
    n = len(datasets)
    assert n == 1600
    for name, share in expected.items():
        observed = datasets.count(name) / n
        tolerance = 5 * math.sqrt(share * (1 - share) / n)  # five binomial standard deviations
        assert abs(observed - share) < tolerance, (weighting, name, observed, share)


def test_the_paper_ratios_no_longer_make_a_batch_almost_all_rain(tmp_path):
    """Three-task sizes (BSD400+WED 5144, Rain100L 200, RESIDE OTS ~72K pairs) and ratios 3/120/1."""
    for name, samples in (("bsd400_wed", 5144), ("rain100l", 200), ("reside_ots", 72135)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "manifest.json").write_text(json.dumps(
            {"shards": [{"name": "shard-000000.tar", "samples": samples, "bytes": 1, "sha256": "0"}]}))

    def shares(weighting):
        cfg = LoaderConfig(sources=[ShardSourceConfig(str(tmp_path / n), weight=w, name=n) for n, w in
                                    (("bsd400_wed", 3.0), ("rain100l", 120.0), ("reside_ots", 1.0))],
                           weighting=weighting)
        return {s.name: s.share for s in source_shares(cfg)}

    assert shares("probability")["rain100l"] > 0.96
    replicated = shares("replicate")
    assert replicated["rain100l"] == pytest.approx(24000 / (15432 + 24000 + 72135))
    assert replicated["reside_ots"] > replicated["rain100l"] > replicated["bsd400_wed"]


def test_a_brace_pattern_needs_its_size_to_be_replicated(sized_sets):
    pattern = str(sized_sets["small"] / "shard-{000000..000000}.tar")
    sources = [ShardSourceConfig(str(sized_sets["big"]), name="big"), ShardSourceConfig(pattern, weight=2.0, name="raw")]
    with pytest.raises(ValueError, match=r"source 'raw': weighting 'replicate' needs the source's size.*samples: N"):
        source_shares(LoaderConfig(sources=sources))
    sources[1].samples = 3
    big = _manifest_total(sized_sets["big"])
    assert source_shares(LoaderConfig(sources=sources))[1].share == pytest.approx(6 / (big + 6))
    assert [s.samples for s in source_shares(LoaderConfig(sources=sources[1:]))] == [3]  # alone: share 1
    with pytest.raises(ValueError, match="'samples' is for brace patterns only"):
        source_shares(LoaderConfig(sources=[ShardSourceConfig(str(sized_sets["big"]), samples=4)]))


def test_start_up_table_is_logged_and_kept_in_the_run(sized_sets, tmp_path, caplog):
    cfg = load_config(Stage1Config, REPO / "configs/stage1_tiny.yaml", [
        f"data.train.sources=[{{location: {sized_sets['big']}, name: big}}, "
        f"{{location: {sized_sets['small']}, name: small, weight: 6}}]",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
    ])
    uri, run_id, _ = find_or_create_run(TrackingConfig(uri=cfg.tracking.uri), "shares", {}, {}, "stage1")
    with caplog.at_level(logging.INFO, logger="perceive_ir.orchestration.trainer"):
        shares = report_source_shares(cfg, RunTracker(uri, run_id))
        # A relaunch replaces the table; relative locations are read from the workers' folder.
        root = sized_sets["big"].parent
        for source in cfg.data.train.sources:
            source.location = str(Path(source.location).relative_to(root))
        assert report_source_shares(cfg, RunTracker(uri, run_id), working_dir=root) == shares
    table = format_shares(shares, "replicate")
    assert table in caplog.text
    lines = table.splitlines()
    assert lines[0] == "training sources (weighting: replicate)" and lines[1].split() == ["source", "samples", "weight", "share"]
    assert lines[3].split()[:3] == ["small", "3", "6"] and lines[3].endswith(f"{100 * shares[1].share:.2f}%")

    from mlflow.tracking import MlflowClient

    folder = MlflowClient(uri).download_artifacts(run_id, SHARES_ARTIFACT, str(tmp_path / "dl"))
    logged = json.loads(Path(folder).read_text())
    rows = [dict(zip(logged["columns"], row)) for row in logged["data"]]
    assert [(r["source"], r["samples"], r["weighting"]) for r in rows] == [
        ("big", shares[0].samples, "replicate"), ("small", 3, "replicate")]
    assert [r["share"] for r in rows] == pytest.approx([s.share for s in shares])


def test_a_stage1_prompt_phase_that_balances_the_sources_gets_its_own_table(sized_sets, tmp_path):
    cfg = load_config(Stage1Config, REPO / "configs/stage1_tiny.yaml", [
        f"data.train.sources=[{{location: {sized_sets['big']}, name: big}}, "
        f"{{location: {sized_sets['small']}, name: small, weight: 6}}]",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "restorer_data={patch_size: 16}",
        "prompt_data={weighting: balanced, batch_size: 4}",
    ])
    phases = cfg.loader_phases()
    assert [(p.name, p.first_step) for p in phases] == [("restorers", 0), ("prompts", cfg.restorer_steps)]
    assert phases[0].loader.patch_size == 16 and phases[0].loader.weighting == "replicate"
    assert phases[1].loader.batch_size == 4 and phases[1].loader.patch_size == cfg.data.train.patch_size
    uri, run_id, _ = find_or_create_run(TrackingConfig(uri=cfg.tracking.uri), "phase-shares", {}, {}, "stage1")
    report_source_shares(cfg, RunTracker(uri, run_id))

    from mlflow.tracking import MlflowClient

    logged = MlflowClient(uri).download_artifacts(run_id, "data", str(tmp_path / "dl"))
    tables = {p.name: json.loads(p.read_text()) for p in Path(logged).iterdir()}
    assert sorted(tables) == ["source_shares.json", "source_shares_prompts.json"]
    prompts = tables["source_shares_prompts.json"]
    rows = [dict(zip(prompts["columns"], row)) for row in prompts["data"]]
    assert [(r["source"], r["share"], r["weighting"]) for r in rows] == [("big", 0.5, "balanced"),
                                                                        ("small", 0.5, "balanced")]
    reused = load_config(Stage1Config, REPO / "configs/stage1_tiny.yaml", ["medium_tier=some/folder"])
    assert [(p.name, p.first_step) for p in reused.loader_phases()] == [("prompts", 0)]  # no restorer phase
