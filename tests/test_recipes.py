"""The dataset recipes of configs/data built from small trees in the datasets' distributed layouts
(names, nesting, formats and the odd files users meet), and the evaluation reading what the builder
reads. With PERCEIVE_IR_RAW_DATA pointing to the raw datasets, the papers' test counts are checked."""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import REPO
from dataset_tools.build import BuildConfig, build_shards, collect_items
from dataset_tools.cli import main as cli
from perceive_ir.config import load_config
from perceive_ir.data.images import decode_rgb8
from perceive_ir.data.pairing import PairRule, list_images, pair_images

RECIPES = REPO / "configs" / "data"
TRAINING = ["bsd400_wed", "rain100l", "reside_ots", "gopro", "lol_v1"]
TESTS = ["sots_outdoor", "rain100l_test", "gopro_test", "lol_v1_eval15", "cbsd68", "kodak24", "mcmaster", "urban100"]
BENCHMARKS = "s3://perceive-ir-raw/benchmarks"
LIFT = 60  # a degraded image is its clean image brightened by LIFT (+5 per further version)


def _image(path: Path, level: int, size=(24, 32), mode: str = "RGB") -> None:
    """A flat image of grey ``level`` in the file's own format (16-bit grey for mode I;16)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "I;16":
        Image.fromarray(np.full(size, level * 257, np.uint16)).save(path)
    else:
        Image.fromarray(np.full((*size, 3), level, np.uint8)).convert(mode).save(path)


class RawTree:
    """Writes the fixture datasets; remembers each kept file's clean grey level (the pairing check)."""

    def __init__(self, root: Path) -> None:
        self.root, self.levels, self.next = root, {}, 20

    def clean(self, rel: str, **kw) -> int:
        level, self.next = self.next, self.next + 3
        _image(self.root / rel, level, **kw)
        self.levels[rel] = level
        return level

    def degraded(self, rel: str, level: int, version: int = 0, **kw) -> None:
        _image(self.root / rel, level + LIFT + 5 * version, **kw)
        self.levels[rel] = level

    def pair(self, lq: str, gt: str, versions=(0,), lq_names=None) -> None:
        level = self.clean(gt)
        for v, name in zip(versions, lq_names or [lq]):
            self.degraded(name, level, v)

    def odd(self, rel: str, data: bytes = b"\x00\x01 not an image") -> None:
        (self.root / rel).parent.mkdir(parents=True, exist_ok=True)
        (self.root / rel).write_bytes(data)


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> RawTree:
    t = RawTree(tmp_path_factory.mktemp("raw"))
    for name in ("100075.jpg", "100080.png"):
        t.clean(f"BSD400/{name}")
    t.odd("BSD400/Thumbs.db")
    t.odd("BSD400/._100075.jpg")  # a macOS resource fork: image extension, no image
    t.odd("BSD400/__MACOSX/BSD400/._100080.png")
    for n in (1, 2):
        t.clean(f"WED/pristine_images/{n:05d}.bmp")
    t.odd("WED/pristine_images/.DS_Store")
    for n in (1, 2, 3):
        t.pair(f"RainTrainL/rain-{n}.png", f"RainTrainL/norain-{n}.png")
    t.clean("RainTrainL/rainstreak-1.png")
    t.degraded("RainTrainL/rain-4.png", 100)  # no norain-4: listed as skipped
    t.pair("", "OTS/clear/0025.jpg", versions=(0, 1),
           lq_names=["OTS/haze/part1/0025_0.8_0.1.jpg", "OTS/haze/part2/0025_1_0.16.jpg"])
    t.pair("OTS/haze/part1/0026_0.9_0.2.jpg", "OTS/clear/0026.jpg")
    t.clean("OTS/clear/0027.jpg")  # a clear image no hazy one uses: listed as skipped
    for n in (1, 2):
        t.pair(f"SOTS/outdoor/hazy/{n:04d}_0.8_0.2.jpg", f"SOTS/outdoor/gt/{n:04d}.png")
    t.odd("SOTS/outdoor/hazy/readme.txt", b"SOTS outdoor")
    for n in (1, 2):
        t.pair(f"Rain100L/rain/norain-{n}.png", f"Rain100L/norain/norain-{n}.png")
    for split, seqs in (("train", ["GOPR0372_07_00", "GOPR0374_11_00"]), ("test", ["GOPR0384_11_00"])):
        for seq in seqs:
            for frame in ("000047.png", "000048.png"):
                folder = f"GOPRO_Large/{split}/{seq}"
                t.pair(f"{folder}/blur/{frame}", f"{folder}/sharp/{frame}")
                t.degraded(f"{folder}/blur_gamma/{frame}", t.levels[f"{folder}/sharp/{frame}"], 2)
    for split, names in (("our485", ["2", "5", "6"]), ("eval15", ["1", "22"])):
        for name in names:
            t.pair(f"LOLdataset/{split}/low/{name}.png", f"LOLdataset/{split}/high/{name}.png")
    t.odd("LOLdataset/eval15/.DS_Store")
    for name in ("0000.png", "0001.png"):
        t.clean(f"CBSD68/original_png/{name}")
    t.degraded("CBSD68/noisy25/0000.png", 99)  # the distribution's noisy copies: left out
    for n in (1, 2):
        t.clean(f"Kodak24/kodim{n:02d}.png")
    t.clean("McMaster/1.tif")
    t.clean("McMaster/2.tif", mode="I;16")  # 16-bit grey TIFF
    t.clean("McMaster/3.tif", mode="L")
    for n in (1, 2):
        t.clean(f"Urban100/img_{n:03d}.png")
    t.clean("Urban100/img_001_SRF_4_LR.png", size=(6, 8))
    return t


# recipe -> (dataset -> images or pairs in the fixture, sources' folders under data_root)
FIXTURE_COUNTS = {
    "bsd400_wed": {"bsd400": 2, "wed": 2}, "rain100l": {"rain100l": 3}, "reside_ots": {"reside_ots": 3},
    "gopro": {"gopro": 4}, "lol_v1": {"lol_v1": 3}, "sots_outdoor": {"sots_outdoor": 2},
    "rain100l_test": {"rain100l": 2}, "gopro_test": {"gopro": 2}, "lol_v1_eval15": {"lol_v1": 2},
    "cbsd68": {"cbsd68": 2}, "kodak24": {"kodak24": 2}, "mcmaster": {"mcmaster": 3}, "urban100": {"urban100": 2},
}
FIXTURE_SKIPPED = {"rain100l": {"rain-4.png"}, "reside_ots": {"0027.jpg"}}


def recipe(name: str, *overrides: str) -> BuildConfig:
    return load_config(BuildConfig, RECIPES / f"{name}.yaml", ["workers=1", "progress=false", *overrides])


def read_samples(folder: Path) -> list[dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    for tar_path in sorted(folder.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar:
                key, _, suffix = m.name.rpartition("/")[2].partition(".")
                samples.setdefault(m.name.rpartition("/")[0] + key, {})[suffix] = tar.extractfile(m).read()
    return list(samples.values())


def _grey(files: dict[str, bytes], role: str) -> float:
    return float(decode_rgb8(next(v for k, v in files.items() if k.startswith(role + ".")))[0].mean())


def paper_test_images(counts: dict[str, int]) -> tuple[int, int]:
    """The test images of the three-task table (CBSD68 at three sigmas, SOTS-outdoor, Rain100L) and of
    the five-task one (plus GoPro and LOL-v1), from the images or pairs per test recipe."""
    three = 3 * counts["cbsd68"] + counts["sots_outdoor"] + counts["rain100l_test"]
    return three, three + counts["gopro_test"] + counts["lol_v1_eval15"]


@pytest.mark.parametrize("name", TRAINING + TESTS)
def test_recipe_builds_its_fixture_tree_with_pairs_and_counts(raw, tmp_path, name):
    expect = FIXTURE_COUNTS[name]
    cfg = recipe(name, f"data_root={raw.root}", f"output={tmp_path / name}", "min_size=0",
                 "expect=" + json.dumps(expect))
    manifest = build_shards(cfg)
    assert manifest.total_samples == sum(expect.values())  # tiles: none, the fixture images are small
    assert {s.source.rsplit("/", 1)[1] for s in manifest.skipped} == FIXTURE_SKIPPED.get(name, set())
    split = "test" if name in TESTS else "train"
    for files in read_samples(tmp_path / name):
        meta = json.loads(files["json"])
        assert meta["split"] == split and meta["tile"] is None
        rel = meta["source"].split("/", 2)[2]
        spec = next(s for s in cfg.sources if s.dataset == meta["dataset"])
        folder = Path(spec.degraded or spec.clean).relative_to(raw.root)  # the file this sample came from
        assert _grey(files, "gt") == pytest.approx(raw.levels[f"{folder}/{rel}"], abs=1.5)  # the right clean image
        if any(k.startswith("lq.") for k in files):
            assert meta["type"] in ("rain", "haze", "motion_blur", "low_light")
            assert LIFT - 2 <= _grey(files, "lq") - _grey(files, "gt") <= LIFT + 7  # its own degraded one
            assert "blur_gamma" not in rel
        else:
            assert meta["type"] == "clean" and "_LR" not in rel and "noisy" not in rel


def test_recipes_write_the_shard_sets_the_profiles_name():
    outputs = {name: recipe(name, "expect={}").output for name in TRAINING + TESTS}
    for name in TRAINING + TESTS:
        cfg = recipe(name)
        assert {s.split for s in cfg.sources} == {"test" if name in TESTS else "train"}, name
        if name in TESTS:
            assert cfg.tile_size is None and not cfg.dedup, name  # whole images, every one of them
    training = {outputs[n] for n in TRAINING}
    for profile in ("stage1", "stage1_five_task", "stage2", "stage2_five_task"):
        sources = yaml.safe_load((REPO / "configs" / f"{profile}.yaml").read_text())["data"]["train"]["sources"]
        assert {s["location"] for s in sources} <= training, profile
    for suite in ("paper", "paper_five_task"):
        sets = yaml.safe_load((REPO / "configs" / "eval" / f"{suite}.yaml").read_text())["sets"]
        for s in sets:
            if "shards" in s:
                assert f"{BENCHMARKS}/{s['shards']}" in {outputs[n] for n in TESTS}, (suite, s)
    assert outputs["cbsd68"] == f"{BENCHMARKS}/shards/cbsd68"


def test_a_recipe_runs_from_the_command_line_with_data_root_and_output(raw, tmp_path, capsys):
    config = str(RECIPES / "sots_outdoor.yaml")
    # The paper's count (500) against the two-pair fixture: an error naming the folders and extensions.
    assert cli(["build", "--config", config, f"data_root={raw.root}", f"output={tmp_path / 'sots'}", "workers=1"]) == 2
    err = capsys.readouterr().err
    assert "'sots_outdoor': 2 pairs found in" in err and "500 expected" in err
    assert str(raw.root / "SOTS/outdoor/hazy") in err and ".tif" in err and ".bmp" in err
    assert not (tmp_path / "sots").exists()  # checked before anything is written
    assert cli(["build", "--config", config, f"data_root={raw.root}", f"output={tmp_path / 'sots'}",
                "expect.sots_outdoor=2", "workers=1", "progress=false"]) == 0
    assert (tmp_path / "sots" / "manifest.json").is_file()
    # An empty copy: no pairs, naming the folders and the rule.
    (tmp_path / "empty" / "SOTS/outdoor/hazy").mkdir(parents=True)
    (tmp_path / "empty" / "SOTS/outdoor/gt").mkdir(parents=True)
    assert cli(["build", "--config", config, f"data_root={tmp_path / 'empty'}", f"output={tmp_path / 'x'}"]) == 2
    err = capsys.readouterr().err
    assert "no pairs by rule reside" in err and "SOTS/outdoor/gt" in err
    assert cli(["build", "--config", config, "--config", config, f"output={tmp_path / 'y'}"]) == 2
    assert "each file names its own output" in capsys.readouterr().err


def test_counting_of_the_papers_test_images(raw):
    counts = {}
    for name in TESTS:
        items, _ = collect_items(recipe(name, f"data_root={raw.root}", "output=unused", "expect={}"))
        counts[name] = len(items)
    assert counts == {n: sum(FIXTURE_COUNTS[n].values()) for n in TESTS}
    assert paper_test_images(counts) == (3 * 2 + 2 + 2, 3 * 2 + 2 + 2 + 2 + 2)


@pytest.mark.skipif(not os.environ.get("PERCEIVE_IR_RAW_DATA"),
                    reason="PERCEIVE_IR_RAW_DATA does not point to the raw datasets")
def test_the_papers_test_counts_on_the_real_datasets():
    root = os.environ["PERCEIVE_IR_RAW_DATA"]
    counts = {}
    for name in TESTS:  # each recipe's expect (the papers' count) is checked while collecting
        items, _ = collect_items(recipe(name, f"data_root={root}", "output=unused"))
        counts[name] = len(items)
    assert paper_test_images(counts) == (68 * 3 + 500 + 100, 68 * 3 + 500 + 100 + 1111 + 15)


def test_pairing_rules_in_one_folder_and_across_folders():
    clean = {"norain-1.png": "u/norain-1.png", "rain-1.png": "u/rain-1.png", "rainstreak-1.png": "u/rainstreak-1.png"}
    pairing = pair_images(clean, clean, PairRule.of("rain100"))
    assert [(p[0], p[2]) for p in pairing.pairs] == [("rain-1.png", "norain-1.png")]
    assert pairing.skipped == [("rainstreak-1.png", "file matches neither pairing pattern")]
    hazy = {"part1/0001_0.8_0.2.jpg": "h1", "part2/0001_1_0.1.jpg": "h2", "part2/0002_1_0.1.jpg": "h3"}
    pairing = pair_images(hazy, {"0001.jpg": "c1", "0002.png": "c2"}, PairRule.of("reside"))
    assert [(p[1], p[3]) for p in pairing.pairs] == [("h1", "c1"), ("h2", "c1"), ("h3", "c2")] and not pairing.skipped
    rule = PairRule.of("pattern", ["{id}_rain.*", "{id}_r.*"], "{id}_clean.*")
    pairing = pair_images({"a/7_r.jpg": "x", "b/7_r.jpg": "y"}, {"a/7_clean.png": "z"}, rule)
    assert [p[0] for p in pairing.pairs] == ["a/7_r.jpg"] and pairing.skipped[0][0] == "b/7_r.jpg"
    with pytest.raises(ValueError, match="no {id}"):
        PairRule.of("pattern", "rain.*", "clean.*")


def test_evaluation_reads_tiff_bmp_and_the_builders_pairings(raw, tmp_path):
    from perceive_ir.config import from_dict
    from perceive_ir.eval.inference import InferenceConfig
    from perceive_ir.eval.scoring import Scorer
    from perceive_ir.eval.suite import SuiteConfig, resolve_suite

    bench = tmp_path / "benchmarks"
    for name in ("sots_outdoor", "cbsd68"):
        build_shards(recipe(name, f"data_root={raw.root}", f"output={bench / 'shards' / name}", "expect={}"))
    (bench / "McMaster").symlink_to(raw.root / "McMaster")
    (bench / "WED").symlink_to(raw.root / "WED" / "pristine_images")
    noise = {"gaussian_noise": ["sigma25"]}
    suite = from_dict(SuiteConfig, {"name": "s", "data_root": str(bench), "sets": [
        {"name": "McMaster", "clean": "McMaster", "degradations": noise, "expect": 3},  # 8-bit, 16-bit, grey TIFF
        {"name": "WED", "clean": "WED", "degradations": noise},  # BMP
        {"name": "CBSD68", "clean": "shards/cbsd68", "degradations": noise, "expect": 2},  # a clean shard set
        {"name": "SOTS", "shards": "shards/sots_outdoor", "type": "haze", "expect": 2},
        {"name": "SOTS-folders", "input": str(raw.root / "SOTS/outdoor/hazy"), "target": str(raw.root / "SOTS/outdoor/gt"),
         "type": "haze", "match": "reside"},
        {"name": "GoPro-folders", "input": str(raw.root / "GOPRO_Large/test"), "target": str(raw.root / "GOPRO_Large/test"),
         "type": "motion_blur", "match": "gopro"},
    ]})
    with pytest.raises(ValueError, match="blur_gamma"):  # a file in neither role is an error, not dropped
        resolve_suite(suite)
    suite.sets[-1].exclude = ["*/blur_gamma/*"]
    _, items, _ = resolve_suite(suite)
    per_set = {}
    for item in items:
        per_set.setdefault(item.set, []).append(item)
    assert {k: len(v) for k, v in per_set.items()} == {"McMaster": 3, "WED": 2, "CBSD68": 2, "SOTS": 2,
                                                      "SOTS-folders": 2, "GoPro-folders": 2}
    assert sorted(i.image for i in per_set["McMaster"]) == ["1", "2", "3"]
    assert sorted(i.image for i in per_set["CBSD68"]) == ["original_png_0000", "original_png_0001"]
    assert sorted(i.image for i in per_set["GoPro-folders"]) == ["GOPR0384_11_00_blur_000047", "GOPR0384_11_00_blur_000048"]
    records = Scorer(lambda x: x, InferenceConfig()).score(items)
    assert len(records) == len(items)
    by_image = {(r.set, r.image): r for r in records}
    assert all(np.isfinite(r.psnr_in) for r in records)
    # The 16-bit TIFF is read by the builder's rule: level * 257 -> level, the same clean image as 8 bits.
    sixteen = next(i for i in per_set["McMaster"] if i.image == "2")
    from perceive_ir.eval.scoring import read_image

    assert read_image(sixteen.clean).mean() == raw.levels["McMaster/2.tif"]
    for item in per_set["SOTS-folders"]:  # paired by the reside rule: the hazy image's own clear image
        lq, gt = read_image(item.degraded), read_image(item.clean)
        assert LIFT - 2 <= lq.mean() - gt.mean() <= LIFT + 2
    assert by_image[("SOTS", per_set["SOTS"][0].image)].psnr_in < 20


def test_an_empty_or_short_test_set_is_an_error_naming_folder_and_extensions(tmp_path):
    from perceive_ir.config import from_dict
    from perceive_ir.eval.suite import EmptySetError, SuiteConfig, resolve_suite

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "Thumbs.db").write_bytes(b"x")
    (tmp_path / "empty" / "notes.txt").write_text("no images")
    (tmp_path / "two").mkdir()
    for n in (1, 2):
        _image(tmp_path / "two" / f"{n}.tif", 50)
    noise = {"gaussian_noise": ["sigma25"]}

    def resolve(**s):
        return resolve_suite(from_dict(SuiteConfig, {"name": "s", "data_root": str(tmp_path), "sets": [
            {"name": "x", "degradations": noise, **s}]}))

    with pytest.raises(EmptySetError) as err:
        resolve(clean="empty", if_missing="skip")  # present but empty: no skip
    assert str(tmp_path / "empty") in str(err.value) and ".tif, .tiff" in str(err.value) and ".bmp" in str(err.value)
    with pytest.raises(EmptySetError, match=r"2 image files, 18 expected .*two.*\.tif"):
        resolve(clean="two", expect=18)
    assert len(resolve(clean="two", expect=2)[1]) == 2
    with pytest.raises(EmptySetError, match="no image pairs"):
        resolve_suite(from_dict(SuiteConfig, {"name": "s", "data_root": str(tmp_path), "sets": [
            {"name": "p", "input": "empty", "target": "empty", "type": "rain"}]}))


def test_list_images_ignores_system_files_and_applies_excludes(raw):
    found = list_images(str(raw.root / "GOPRO_Large"), exclude=["*/blur_gamma/*"])
    assert len(found) == 12 and not any("blur_gamma" in r for r in found)
    assert sorted(list_images(str(raw.root / "BSD400"))) == ["100075.jpg", "100080.png"]
