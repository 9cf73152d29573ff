"""The shard builder on real photos: clean and paired sources, bad files, conversions,
de-duplication, tiling, byte bounds, kill-and-rerun equality, and verify."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, shared_dataset
from dataset_tools.build import BuildConfig, build_shards
from dataset_tools.cli import main as cli
from dataset_tools.sources import SourceSpec
from dataset_tools.verify import verify
from perceive_ir.config import from_dict
from perceive_ir.data.images import decode_rgb8, pixel_hash


def read_samples(folder: Path) -> dict[str, dict[str, bytes]]:
    """key -> {suffix: bytes} over every shard of a set (the data, whatever the shard names)."""
    samples: dict[str, dict[str, bytes]] = {}
    for tar_path in sorted(folder.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar:
                folder_part, _, base = m.name.rpartition("/")
                stem, _, suffix = base.partition(".")
                samples.setdefault(f"{folder_part}/{stem}", {})[suffix] = tar.extractfile(m).read()
    return samples


def small_photos(src: Path, dest: Path, n: int = 6, size: int = 96) -> Path:
    """Real photos, shrunk so that tests run fast."""
    dest.mkdir(parents=True, exist_ok=True)
    for path in sorted(src.iterdir())[:n]:
        img = Image.open(path).convert("RGB")
        img.thumbnail((size, size))
        img.save(dest / (path.stem + ".png"))
    return dest


def config(output, sources, **kw) -> BuildConfig:
    kw.setdefault("progress", False)
    return BuildConfig(output=str(output), sources=sources, **kw)


def test_clean_build_writes_manifest_and_metadata(package_photos, tmp_path):
    photos = small_photos(package_photos, tmp_path / "photos")
    manifest = build_shards(config(tmp_path / "out", [SourceSpec("pkg", str(photos), split="val")],
                                   max_samples_per_shard=4))
    assert manifest.total_samples == 6 and [s.samples for s in manifest.shards] == [4, 2]
    assert manifest.counts == {"pkg/val/clean": 6}
    samples = read_samples(tmp_path / "out")
    meta = json.loads(next(iter(samples.values()))["json"])
    assert {meta["dataset"], meta["split"], meta["type"]} == {"pkg", "val", "clean"}
    assert len(meta["sha256"]) == 64 and meta["size"][0] > 0
    on_disk = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert on_disk["totals"] == {"shards": 2, "samples": 6, "bytes": manifest.total_bytes, "skipped": 0}
    assert on_disk["args"]["max_samples_per_shard"] == 4
    assert verify(str(tmp_path / "out"), progress=False).ok


def test_paired_rain100l_same_path(tmp_path):
    rain = shared_dataset("Rain100L_subset3")
    src = SourceSpec("rain100l", str(rain / "target"), degraded=str(rain / "input"),
                     degradation="rain", match="same_path", split="test")
    build_shards(config(tmp_path / "out", [src]))
    samples = read_samples(tmp_path / "out")
    assert len(samples) == 3
    for key, files in samples.items():
        name = key.rsplit("/", 1)[1].replace("_png", ".png")
        assert files["gt.png"] == (rain / "target" / name).read_bytes()  # original bytes kept
        assert files["lq.png"] == (rain / "input" / name).read_bytes()
        assert json.loads(files["json"])["type"] == "rain"


@pytest.mark.parametrize("rule, lq_names, gt_names", [
    ("rain100", ["rain-1.png", "rain-2.png", "rain-9.png"], ["norain-1.png", "norain-2.png"]),
    ("reside", ["0001_0.8_0.2.jpg", "0001_0.9_0.1.jpg", "0002_1_0.08.jpg"], ["0001.png", "0002.png", "0003.png"]),
])
def test_pairing_rules(package_photos, tmp_path, rule, lq_names, gt_names):
    photos = sorted(small_photos(package_photos, tmp_path / "p", n=3).iterdir())
    for folder, names in (("lq", lq_names), ("gt", gt_names)):
        (tmp_path / folder).mkdir()
    ids = {}
    for name in gt_names:
        photo = photos[len(ids)]
        ids[name.split(".")[0].replace("norain-", "")] = photo
        shutil.copy(photo, tmp_path / "gt" / name)
    for name in lq_names:
        ident = name.split("_")[0] if rule == "reside" else name.split(".")[0].replace("rain-", "")
        source = np.asarray(Image.open(ids.get(ident, photos[-1])), dtype=np.float64)
        veil = 0.2 + 0.1 * lq_names.index(name)  # each degraded version differs
        Image.fromarray(np.uint8(source * (1 - veil) + 255 * veil)).save(tmp_path / "lq" / name)
    src = SourceSpec("pairs", str(tmp_path / "gt"), degraded=str(tmp_path / "lq"), degradation="haze", match=rule)
    manifest = build_shards(config(tmp_path / "out", [src]))
    reasons = {s.source.rsplit("/", 1)[1]: s.reason for s in manifest.skipped}
    if rule == "rain100":
        assert manifest.total_samples == 2
        assert "no clean counterpart" in reasons["rain-9.png"]
    else:
        assert manifest.total_samples == 3  # two hazy versions share 0001.png
        assert "no degraded counterpart" in reasons["0003.png"]
    clean_ids = set()
    for files in read_samples(tmp_path / "out").values():
        gt, _ = decode_rgb8(files[[k for k in files if k.startswith("gt.")][0]])
        lq, _ = decode_rgb8(files[[k for k in files if k.startswith("lq.")][0]])
        assert gt.shape == lq.shape
        meta = json.loads(files["json"])
        assert meta["clean_sha256"] == pixel_hash(gt) != meta["image_sha256"]  # the clean side alone
        clean_ids.add(meta["clean_sha256"])
    assert len(clean_ids) == 2  # both hazy versions of 0001.png carry its identity


def test_corrupt_files_are_skipped_and_listed(package_photos, tmp_path):
    photos = small_photos(package_photos, tmp_path / "photos", n=3)
    good = (photos / sorted(os.listdir(photos))[0]).read_bytes()
    (photos / "truncated.png").write_bytes(good[: len(good) // 2])
    (photos / "not_an_image.jpg").write_bytes(b"this is text, not a JPEG" * 10)
    (photos / "empty.webp").write_bytes(b"")
    manifest = build_shards(config(tmp_path / "out", [SourceSpec("pkg", str(photos))]))
    assert manifest.total_samples == 3
    skipped = {s.source.rsplit("/", 1)[1]: s.reason for s in manifest.skipped}
    assert set(skipped) == {"truncated.png", "not_an_image.jpg", "empty.webp"}
    assert all("corrupt gt image" in r for r in skipped.values())


def test_pixel_formats_are_converted_by_the_documented_rule(package_photos, tmp_path):
    rgb = np.asarray(Image.open(package_photos / "skimage_astronaut.png").convert("RGB").resize((64, 64)))
    grey = rgb.mean(axis=2).astype(np.uint8)
    folder = tmp_path / "formats"
    folder.mkdir()
    Image.fromarray(grey, "L").save(folder / "grey.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(folder / "sixteen.png")  # 16-bit grey
    rgba = np.dstack([rgb, np.full((64, 64), 128, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(folder / "alpha.png")
    Image.fromarray(rgb).convert("CMYK").save(folder / "cmyk.tif")
    Image.fromarray(rgb).save(folder / "plain.bmp")
    build_shards(config(tmp_path / "out", [SourceSpec("fmt", str(folder))], dedup=False))
    out = {k.rsplit("/", 1)[1]: v for k, v in read_samples(tmp_path / "out").items()}
    decoded = {k: decode_rgb8(v["gt.png"])[0] for k, v in out.items()}
    assert all(a.shape == (64, 64, 3) and a.dtype == np.uint8 for a in decoded.values())
    assert np.array_equal(decoded["grey_png"][..., 0], grey) and np.array_equal(decoded["grey_png"][..., 2], grey)
    assert np.array_equal(decoded["sixteen_png"][..., 1], grey)  # 257 * v / 257 == v
    white_mix = np.rint((rgb.astype(float) * 128 + 255 * 127) / 255)
    assert np.abs(decoded["alpha_png"].astype(float) - white_mix).max() <= 1  # composited over white
    assert np.array_equal(decoded["plain_bmp"], rgb)  # BMP re-encoded losslessly as PNG
    assert np.abs(decoded["cmyk_tif"].astype(int) - rgb).mean() < 2


def test_duplicates_are_dropped_by_pixel_content(package_photos, tmp_path):
    photos = small_photos(package_photos, tmp_path / "photos", n=3)
    first = sorted(photos.iterdir())[0]
    Image.open(first).save(photos / "copy_as.bmp")  # same pixels, another file format
    manifest = build_shards(config(tmp_path / "out", [SourceSpec("pkg", str(photos))], shuffle=False))
    assert manifest.total_samples == 3
    assert [s.reason for s in manifest.skipped] == ["duplicate content (same pixels as an earlier image)"]
    kept_all = build_shards(config(tmp_path / "out2", [SourceSpec("pkg", str(photos))], dedup=False))
    assert kept_all.total_samples == 4


def test_tiling_covers_the_image_with_border_tiles(package_photos, tmp_path):
    folder = tmp_path / "one"
    folder.mkdir()
    img = Image.open(package_photos / "skimage_astronaut.png").convert("RGB").resize((200, 150))
    img.save(folder / "astronaut.png")
    build_shards(config(tmp_path / "out", [SourceSpec("pkg", str(folder))], tile_size=64, tile_stride=48))
    samples = read_samples(tmp_path / "out")
    origins = sorted(tuple(json.loads(s["json"])["tile"]) for s in samples.values())
    ys, xs = sorted({o[0] for o in origins}), sorted({o[1] for o in origins})
    assert ys == [0, 48, 86] and xs == [0, 48, 96, 136]  # the last tile is flush with the border
    full = np.asarray(img)
    for s in samples.values():
        meta = json.loads(s["json"])
        y, x = meta["tile"]
        assert np.array_equal(decode_rgb8(s["gt.png"])[0], full[y : y + 64, x : x + 64])
        assert meta["clean_sha256"] == pixel_hash(full)  # every tile: the identity of the whole image


def test_shards_respect_the_byte_bound(package_photos, tmp_path):
    photos = small_photos(package_photos, tmp_path / "photos", n=8, size=128)
    bound = 120_000
    manifest = build_shards(config(tmp_path / "out", [SourceSpec("pkg", str(photos))], max_bytes_per_shard=bound))
    assert len(manifest.shards) > 1 and manifest.total_samples == 8
    assert all(s.bytes <= bound for s in manifest.shards if s.samples > 1)
    assert all(os.path.getsize(tmp_path / "out" / s.name) == s.bytes for s in manifest.shards)


def _build_cmd(photos: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "dataset_tools.cli", "build", str(out), "--clean", str(photos),
            "--dataset", "pkg", "tile_size=40", "tile_stride=20", "max_samples_per_shard=3",
            "progress=false", "seed=7"]


@pytest.mark.slow
def test_kill_and_rerun_gives_exactly_the_uninterrupted_samples(package_photos, tmp_path):
    photos = small_photos(package_photos, tmp_path / "photos", n=8, size=200)
    reference = tmp_path / "reference"
    subprocess.run(_build_cmd(photos, reference), check=True, cwd=REPO, capture_output=True)
    expected = read_samples(reference)
    assert len(expected) > 300

    out = tmp_path / "killed"
    kills = 0
    for shards_before_kill in (15, 60, 120):  # kill -9 at several moments of the build
        proc = subprocess.Popen(_build_cmd(photos, out), cwd=REPO, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline and len(list(out.glob("*.tar"))) < shards_before_kill:
            time.sleep(0.01)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        if (out / "manifest.json").exists():
            break
        assert not [p for p in out.glob("*.tar") if p.stat().st_size % 512]  # no torn shard visible
    assert kills >= 2, "the build finished before it could be killed twice"
    subprocess.run(_build_cmd(photos, out), check=True, cwd=REPO, capture_output=True)

    assert read_samples(out) == expected  # none missing, none twice, same bytes
    assert json.loads((out / "manifest.json").read_text())["shards"] == json.loads(
        (reference / "manifest.json").read_text())["shards"]
    assert not list(out.glob("*.partial")) and not (out / ".build-state").exists()


@pytest.mark.slow
def test_resume_refuses_a_changed_input_set(package_photos, tmp_path):
    photos = small_photos(package_photos, tmp_path / "photos", n=8, size=200)
    out = tmp_path / "out"
    proc = subprocess.Popen(_build_cmd(photos, out), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline and len(list(out.glob("*.tar"))) < 10:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()
    Image.open(sorted(photos.iterdir())[0]).save(photos / "added_later.png")
    rerun = subprocess.run(_build_cmd(photos, out), cwd=REPO, capture_output=True, text=True)
    assert rerun.returncode == 2 and "other input files" in rerun.stderr


def test_verify_catches_a_modified_shard(package_photos, tmp_path, capsys):
    photos = small_photos(package_photos, tmp_path / "photos", n=4)
    build_shards(config(tmp_path / "out", [SourceSpec("pkg", str(photos))], max_samples_per_shard=2))
    assert cli(["verify", str(tmp_path / "out")]) == 0
    shard = tmp_path / "out" / "shard-000001.tar"
    data = bytearray(shard.read_bytes())
    data[600] ^= 0xFF  # flip bits inside the first member's payload
    shard.write_bytes(bytes(data))
    assert cli(["verify", str(tmp_path / "out")]) == 1
    out = capsys.readouterr().out
    assert "shard-000001.tar: sha256 differs" in out and "FAILED" in out
    (tmp_path / "out" / "shard-000000.tar").unlink()
    report = verify(str(tmp_path / "out"), progress=False)
    assert any("shard-000000.tar" in p and "does not exist" in p for p in report.problems)


def test_rerun_of_a_finished_build_is_a_no_op_and_other_args_are_refused(package_photos, tmp_path):
    photos = small_photos(package_photos, tmp_path / "photos", n=2)
    cfg = config(tmp_path / "out", [SourceSpec("pkg", str(photos))])
    first = build_shards(cfg)
    mtime = (tmp_path / "out" / "shard-000000.tar").stat().st_mtime_ns
    assert build_shards(cfg).shards == first.shards
    assert (tmp_path / "out" / "shard-000000.tar").stat().st_mtime_ns == mtime
    with pytest.raises(RuntimeError, match="other arguments"):
        build_shards(config(tmp_path / "out", [SourceSpec("pkg", str(photos))], encode="jpeg"))


def test_inspect_counts_by_label_and_size(package_photos, tmp_path, capsys):
    photos = small_photos(package_photos, tmp_path / "photos", n=5)
    build_shards(config(tmp_path / "out", [SourceSpec("pkg", str(photos), split="train")]))
    assert cli(["inspect", str(tmp_path / "out"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["counts"] == {"pkg/train/clean": 5}
    assert sum(summary["short_side_histogram"].values()) == 5


def test_build_config_from_yaml_names_bad_keys(tmp_path, capsys):
    bad = tmp_path / "build.yaml"
    bad.write_text("output: out\nsources:\n  - dataset: a\n    clean: x\n    splitt: train\n")
    assert cli(["build", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'sources[0].splitt'" in err and str(bad) in err


def test_missing_source_folder_is_a_clear_error(tmp_path, capsys):
    assert cli(["build", str(tmp_path / "out"), "--clean", str(tmp_path / "nowhere"), "--dataset", "x"]) == 2
    assert "nowhere' does not exist" in capsys.readouterr().err
    with pytest.raises(Exception, match="needs 'degradation'"):
        from_dict(SourceSpec, {"dataset": "a", "clean": "x", "degraded": "y"})
