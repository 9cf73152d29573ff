"""The benchmark protocol: full-image inference, seeded test sets, and jobs/evaluate.py end to end on a
real local Ray with MLflow on SQLite (a registered version of a tiny trained restorer)."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from _model_fixtures import TINY_NAFNET
from conftest import REPO
from perceive_ir.config import from_dict, load_config
from perceive_ir.eval.inference import FullImageRestorer, InferenceConfig, pad_multiple, pad_reflect, tile_spans
from perceive_ir.eval.scoring import Scorer
from perceive_ir.eval.suite import MissingSetError, SetConfig, SuiteConfig, resolve_suite
from perceive_ir.models import RestorerConfig

sys.path.insert(0, str(REPO / "jobs"))


@pytest.fixture(scope="module")
def photo_sets(tmp_path_factory):
    """Small real test sets: 4 clean photo crops of two sizes, and 2 pairs with real JPEG damage."""
    from skimage import data

    root = tmp_path_factory.mktemp("sets")
    for folder in ("clean", "input", "target"):
        (root / folder).mkdir()
    for k, name in enumerate(("astronaut", "coffee", "chelsea", "rocket")):
        photo = np.asarray(getattr(data, name)())[..., :3]
        h, w = (61, 83) if k % 2 else (70, 52)  # odd sizes: padding must round-trip
        Image.fromarray(photo[100 : 100 + h, 120 : 120 + w]).save(root / "clean" / f"{name}.png")
        if k < 2:
            Image.fromarray(photo[100 : 100 + h, 120 : 120 + w]).save(root / "target" / f"{name}.png")
            Image.fromarray(photo[100 : 100 + h, 120 : 120 + w]).save(root / "input" / f"{name}.jpg", quality=15)
    return root


def small_suite(root, **extra) -> dict:
    return {"name": "small", "data_root": str(root), "seed": 3, **extra, "sets": [
        {"name": "photos", "clean": "clean", "degradations": {"gaussian_noise": ["sigma25"], "haze": ["light", "heavy"]}},
        {"name": "jpeg-pairs", "input": "input", "target": "target", "type": "jpeg"},
    ]}


def test_identity_restorer_scores_exactly_its_input(photo_sets):
    suite = from_dict(SuiteConfig, small_suite(photo_sets))
    _, items, _ = resolve_suite(suite)
    records = Scorer(lambda x: x, InferenceConfig(), seed=suite.seed, multiple=16).score(items)
    assert len(records) == 4 * 3 + 2
    for r in records:
        assert r.psnr_out == r.psnr_in < 100 and r.ssim_out == r.ssim_in < 1, r
    assert {(r.height, r.width) for r in records} == {(61, 83), (70, 52)}


def test_seeded_inputs_do_not_depend_on_batching_or_worker_split(photo_sets):
    suite = from_dict(SuiteConfig, small_suite(photo_sets))
    _, items, _ = resolve_suite(suite)
    whole = Scorer(lambda x: x, InferenceConfig(batch_size=4), seed=3).score(items)
    split = [r for part in (items[::2], items[1::2]) for r in Scorer(lambda x: x, InferenceConfig(batch_size=1), seed=3).score(part)]
    key = lambda r: (r.set, r.type, r.level, r.image)  # noqa: E731
    assert sorted(((key(r), r.psnr_in) for r in whole)) == sorted(((key(r), r.psnr_in) for r in split))
    other_seed = {key(r): r.psnr_in for r in Scorer(lambda x: x, InferenceConfig(), seed=4).score(items)}
    assert any(other_seed[key(r)] != r.psnr_in for r in whole if r.level)


def test_padding_round_trips_odd_sizes_and_feeds_the_multiple():
    seen = []

    def identity(x):
        seen.append(tuple(x.shape[-2:]))
        return x

    restorer = FullImageRestorer(identity, InferenceConfig(tile_size=None), multiple=16)
    for h, w in [(37, 45), (61, 83), (5, 9), (64, 32)]:
        x = torch.rand(2, 3, h, w)
        padded = pad_reflect(x, 16)
        assert padded.shape[-2] % 16 == 0 and padded.shape[-1] % 16 == 0
        torch.testing.assert_close(padded[..., :h, :w], x, rtol=0, atol=0)
        assert torch.equal(restorer(x), x)
    assert all(h % 16 == 0 and w % 16 == 0 for h, w in seen)
    nafnet = RestorerConfig(backbone={"name": "nafnet", "params": TINY_NAFNET}, conditioning={"name": "none"}).build()
    assert pad_multiple(nafnet) == 16 and pad_multiple(torch.nn.Conv2d(3, 3, 1)) == 8


def test_tiles_partition_the_image():
    for length in (64, 336, 496, 1040):
        spans = tile_spans(length, 128, 32, 16)
        kept = [i for _, _, a, b in spans for i in range(a, b)]
        assert kept == list(range(length))
        for start, end, keep_start, keep_end in spans:
            assert start % 16 == 0 and start <= keep_start < keep_end <= end <= length


def test_tiled_equals_untiled_for_a_convolution_only_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.GELU(),
                                torch.nn.Conv2d(8, 8, 5, padding=2), torch.nn.GELU(),
                                torch.nn.Conv2d(8, 3, 3, padding=1)).eval()
    x = torch.rand(2, 3, 150, 203)
    whole = FullImageRestorer(model, InferenceConfig(tile_size=None), multiple=8)(x)
    tiled = FullImageRestorer(model, InferenceConfig(tile_size=64, tile_overlap=16), multiple=8)(x)
    assert tiled.shape == x.shape
    torch.testing.assert_close(tiled, whole, rtol=0, atol=1e-4)
    # too little overlap for the receptive field (4 px): the seams show
    seams = FullImageRestorer(model, InferenceConfig(tile_size=64, tile_overlap=0), multiple=8)(x)
    assert (seams - whole).abs().max() > 1e-3


def test_a_missing_set_fails_before_the_model_is_loaded(photo_sets, tmp_path, capsys):
    import evaluate

    suite = small_suite(photo_sets)
    suite["sets"].append({"name": "SOTS", "shards": "no/such/shards"})
    config = tmp_path / "suite.yaml"
    import yaml

    config.write_text(yaml.safe_dump(suite))
    # the model does not exist either: the set must be what is reported
    assert evaluate.main(["--config", str(config), f"model={tmp_path / 'no-model'}"]) == 2
    err = capsys.readouterr().err
    assert "set 'SOTS' not found" in err and "no/such/shards" in err and "no-model" not in err
    with pytest.raises(MissingSetError, match="'photos'"):
        resolve_suite(from_dict(SuiteConfig, {"name": "x", "data_root": str(tmp_path),
                                              "sets": [{"name": "photos", "clean": "absent", "degradations": {"haze": ["light"]}}]}))
    skipped = {"name": "x", "data_root": str(tmp_path), "sets": [
        {"name": "gone", "clean": "absent", "degradations": {"haze": ["light"]}, "if_missing": "skip"}],
        "fallback": [{"name": "photos", "clean": str(photo_sets / "clean"), "degradations": {"haze": ["light"]}}]}
    used, items, notes = resolve_suite(from_dict(SuiteConfig, skipped))
    assert [s.name for s in used] == ["photos"] and len(items) == 4 and "gone" in notes[0]
    with pytest.raises(ValueError, match="has no level 'sigma25'"):
        SetConfig("x", clean="c", degradations={"haze": ["sigma25"]})


def test_an_unreachable_data_root_is_no_missing_set_and_exits_1(tmp_path, monkeypatch, capsys):
    """The fallback sets replace sets that are absent, not a store that does not answer."""
    import evaluate
    import yaml

    from conftest import _free_port

    url = f"http://127.0.0.1:{_free_port()}"  # a closed port
    for name, value in {"AWS_ACCESS_KEY_ID": "local-test", "AWS_SECRET_ACCESS_KEY": "local-test",
                        "AWS_MAX_ATTEMPTS": "1", "AWS_ENDPOINT_URL": url}.items():
        monkeypatch.setenv(name, value)  # restored after the test (--endpoint-url sets the last one)
    config = tmp_path / "suite.yaml"
    config.write_text(yaml.safe_dump({"name": "x", "data_root": "s3://bucket/sets", "sets": [
        {"name": "gone", "clean": "clean", "degradations": {"haze": ["light"]}, "if_missing": "skip"}],
        "fallback": [{"name": "photos", "clean": "package:photos", "degradations": {"haze": ["light"]}}]}))
    assert evaluate.main(["--config", str(config), f"model={tmp_path / 'no-model'}", "--endpoint-url", url]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err[-1].startswith("evaluate: cannot list 's3://bucket/sets/clean'") and url in err[-1], err
    assert "Traceback" not in "\n".join(err)


def test_paired_test_shards_are_scored_whole(photo_sets, tmp_path):
    from dataset_tools.build import BuildConfig, build_shards
    from dataset_tools.sources import SourceSpec

    source = SourceSpec("jpegpairs", str(photo_sets / "target"), split="test", degraded=str(photo_sets / "input"),
                        degradation="jpeg")
    build_shards(BuildConfig(output=str(tmp_path / "test"), sources=[source], progress=False))
    suite = from_dict(SuiteConfig, {"name": "s", "data_root": str(tmp_path), "sets": [{"name": "pairs", "shards": "test"}]})
    _, items, _ = resolve_suite(suite)
    assert [i.image.split("_")[0] for i in items] == ["astronaut", "coffee"] and {i.type for i in items} == {"jpeg"}
    folders = from_dict(SuiteConfig, small_suite(photo_sets))
    expected = {r.image: r.psnr_in for r in Scorer(lambda x: x, InferenceConfig()).score(resolve_suite(folders)[1])
                if r.set == "jpeg-pairs"}
    records = Scorer(lambda x: x, InferenceConfig()).score(items)
    # the same pairs, whole, as from the folders
    assert {r.image.split("_")[0]: r.psnr_in for r in records} == expected

    build_shards(BuildConfig(output=str(tmp_path / "tiled"), sources=[source], tile_size=32, progress=False))
    tiled = {"name": "s", "data_root": str(tmp_path), "sets": [{"name": "pairs", "shards": "tiled"}]}
    with pytest.raises(ValueError, match="is a tile"):
        resolve_suite(from_dict(SuiteConfig, tiled))


def _train_tiny_restorer(photo_sets, steps: int = 30):
    """A tiny NAFNet that learns to denoise crops of the photos for a few Adam steps."""
    cfg = RestorerConfig(backbone={"name": "nafnet", "params": TINY_NAFNET}, conditioning={"name": "none"})
    torch.manual_seed(0)
    net = cfg.build()
    clean = torch.stack([torch.from_numpy(np.array(Image.open(p))[:48, :48]).permute(2, 0, 1).float() / 255
                         for p in sorted((photo_sets / "clean").glob("*.png"))])
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        noisy = (clean + 25 / 255 * torch.randn(clean.shape, generator=gen)).clamp(0, 1)
        loss = (net(noisy) - clean).abs().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return net.eval(), cfg


@pytest.mark.slow
def test_evaluation_of_a_registered_tiny_restorer_on_ray(photo_sets, tmp_path, capsys):
    import ray
    from mlflow.tracking import MlflowClient

    import evaluate
    from perceive_ir.tracking import RunTracker, TrackingConfig, find_or_create_run
    from perceive_ir.products import save_restorer

    net, cfg = _train_tiny_restorer(photo_sets)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _, train_run, _ = find_or_create_run(TrackingConfig(uri=uri, experiment="eval-test"), "train", {}, {}, "stage2")
    tracker = RunTracker(uri, train_run)
    tracker.log_folder(save_restorer(net, cfg, tmp_path / "restorer"), "restorer")
    model = tracker.register("restorer", "tiny-restorer")
    assert model == "models:/tiny-restorer/1"

    config = tmp_path / "suite.yaml"
    import yaml

    published = tmp_path / "published.yaml"
    published.write_text(yaml.safe_dump({"small": {"columns": ["noise", "jpeg", "average"], "rows": {
        "Perceive-IR": {"psnr": [30.0, 32.0, 31.0], "ssim": [0.9, 0.95, 0.925], "source": "a paper"}}}}))
    config.write_text(yaml.safe_dump(small_suite(photo_sets, paper_table={
        "recipe": "small", "published": str(published),
        "columns": {"noise": "photos/gaussian_noise/sigma25", "jpeg": "jpeg-pairs/jpeg"}})))
    try:
        code = evaluate.main(["--config", str(config), f"model={model}", f"tracking.uri={uri}",
                              "tracking.experiment=eval-test", f"output={tmp_path / 'reports'}", "ray.num_workers=2",
                              "ray.resources_per_worker={CPU: 1}", "ray.local_cpus=2", "inference.batch_size=2",
                              "grid_images=2", "progress=false"])
    finally:
        ray.shutdown()
    out = capsys.readouterr().out
    assert code == 0, out
    assert "| photos | haze | heavy | 4 |" in out and "| jpeg-pairs | jpeg | - | 2 |" in out and "curves:" in out

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    (run,) = [r for r in client.search_runs([client.get_experiment_by_name("eval-test").experiment_id])
              if r.data.tags.get("job") == "evaluate"]
    tags, metrics = run.data.tags, run.data.metrics
    assert tags["eval.model"] == model and tags["eval.run_id"] == train_run
    assert tags["eval.model_name"] == "tiny-restorer" and tags["eval.model_version"] == "1"
    assert len(tags["eval.suite_hash"]) == 16 and tags["eval.suite"] == "small"
    files = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert {f"evaluation/{f}" for f in ("table.md", "table.csv", "per_image.csv", "severity_curves.png",
                                         "best_worst.png", "suite.yaml")} <= files
    # the papers' table: the published row, this model's row from the table above, the difference
    noise, jpeg = (metrics[f"eval/{key}/psnr_out"] for key in ("photos/gaussian_noise/sigma25", "jpeg-pairs/jpeg/test"))
    assert math.isclose(metrics["paper/average/psnr"], (noise + jpeg) / 2, abs_tol=1e-6)
    assert math.isclose(metrics["paper/delta_average/psnr"], (noise + jpeg) / 2 - 31.0, abs_tol=1e-6)
    assert "| Perceive-IR | 30.00 / 0.900 | 32.00 / 0.950 | 31.00 / 0.925 | a paper |" in out
    assert f"| **{model}** | **{noise:.2f} / " in out and "| vs Perceive-IR | " in out
    assert {"evaluation/paper_table.md", "evaluation/paper_table.csv"} <= files
    # the trained restorer denoises; the identity start keeps it from hurting the other types much
    assert metrics["eval/photos/gaussian_noise/sigma25/psnr_out"] > metrics["eval/photos/gaussian_noise/sigma25/psnr_in"] + 0.5
    version = client.get_model_version("tiny-restorer", "1")
    assert version.tags["eval.small.suite_hash"] == tags["eval.suite_hash"]
    assert math.isclose(float(version.tags["eval.small.psnr_out"]), metrics["eval/average/psnr_out"], abs_tol=1e-3)

    # the workers' numbers are the ones of a plain one-process Scorer on the same images
    from perceive_ir.workflows.evaluation import EvalConfig

    suite = load_config(EvalConfig, config)
    _, items, _ = resolve_suite(suite)
    local = {(r.set, r.type, r.level, r.image): r for r in Scorer(net, InferenceConfig(), seed=suite.seed).score(items)}
    (table,) = [p for p in (tmp_path / "reports").glob("small-*/per_image.csv")]
    import csv

    for row in csv.DictReader(table.open()):
        expected = local[row["set"], row["type"], row["level"], row["image"]]
        assert math.isclose(float(row["psnr_out"]), expected.psnr_out, abs_tol=1e-4)
        assert math.isclose(float(row["ssim_in"]), expected.ssim_in, abs_tol=1e-6)
    with Image.open(next((tmp_path / "reports").glob("small-*/severity_curves.png"))) as plot:
        assert plot.size[0] > 300


@pytest.mark.parametrize("suite", ["paper.yaml", "paper_five_task.yaml"])
def test_the_paper_suites_map_every_published_test_set_to_a_row_they_score(suite, tmp_path):
    """Without data or a model: each suite's paper_table names the published test sets of its recipe and
    rows its own sets define (the evaluation checks the scored rows again before loading a model)."""
    from perceive_ir.eval.paper_table import AVERAGE, load_published, resolve_published_path
    from perceive_ir.workflows.evaluation import EvalConfig

    cfg = load_config(EvalConfig, REPO / "configs/eval" / suite)
    defined = set()
    for s in cfg.sets:
        for kind, levels in (s.degradations.items() if s.clean else [(s.type, [""])]):
            defined |= {(s.name, kind, level) for level in levels}
    published = load_published(resolve_published_path(cfg.paper_table.published, REPO), cfg.paper_table, defined)
    assert "Perceive-IR" in published.rows and published.columns[-1] == AVERAGE
    assert len(cfg.paper_table.columns) == len(published.columns) - 1


def test_a_paper_table_that_does_not_fit_the_suite_fails_naming_what(tmp_path):
    from perceive_ir.eval.paper_table import PaperTableConfig, load_published

    published = REPO / "configs/eval/published_results.yaml"
    scored = [("CBSD68", "gaussian_noise", "sigma25"), ("SOTS", "haze", "")]
    with pytest.raises(ValueError, match="missing: cbsd68_sigma15, .*rain100l"):
        load_published(published, PaperTableConfig("three_task", {"cbsd68_sigma25": "CBSD68/gaussian_noise/sigma25"}),
                       scored)
    columns = {"sots_outdoor": "SOTS/haze", "rain100l": "Rain100L/rain", "cbsd68_sigma25": "CBSD68/gaussian_noise/sigma25",
               "gopro": "GoPro/motion_blur", "lol_v1": "LOL/low_light"}
    with pytest.raises(ValueError, match="rows the suite does not score: rain100l -> Rain100L/rain; gopro"):
        load_published(published, PaperTableConfig("five_task", columns), scored)
    with pytest.raises(ValueError, match="recipe 'seven_task' is not in .*: three_task, five_task"):
        load_published(published, PaperTableConfig("seven_task", columns), scored)
