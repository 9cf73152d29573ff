"""The training stream: aligned pairs, counted bad samples, equal batches on every rank."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as tmp_mp
from PIL import Image

from dataset_tools.build import BuildConfig, build_shards
from dataset_tools.sources import SourceSpec
from perceive_ir.config import ConfigError, from_dict
from perceive_ir.data.pipeline import BatchPlan, LoaderConfig, ShardSourceConfig, build_loader


def make_inverted_pairs(photos: Path, dest: Path, n: int = 6, size: int = 96) -> Path:
    """Real photos as clean images, their colour negatives as the 'degraded' side: lq = 255 - gt
    holds pixel for pixel only if crops and flips stay aligned."""
    for side in ("gt", "lq"):
        (dest / side).mkdir(parents=True, exist_ok=True)
    for path in sorted(photos.iterdir())[:n]:
        img = Image.open(path).convert("RGB")
        img.thumbnail((size, size))
        arr = np.asarray(img)
        Image.fromarray(arr).save(dest / "gt" / (path.stem + ".png"))
        Image.fromarray(255 - arr).save(dest / "lq" / (path.stem + ".png"))
    return dest


@pytest.fixture(scope="module")
def paired_shards(package_photos, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("paired")
    pairs = make_inverted_pairs(package_photos, root / "src")
    src = SourceSpec("neg", str(pairs / "gt"), degraded=str(pairs / "lq"), degradation="invert")
    build_shards(BuildConfig(output=str(root / "shards"), sources=[src], max_samples_per_shard=2, progress=False))
    return root / "shards"


def loader_config(location, **kw) -> LoaderConfig:
    defaults = dict(patch_size=48, batch_size=4, samples_per_epoch=32, num_workers=0, shuffle_buffer=8)
    defaults.update(kw)
    return LoaderConfig(sources=[ShardSourceConfig(str(location))], **defaults)


@pytest.mark.parametrize("workers", [0, 2])
def test_pairs_stay_aligned_through_crops_and_flips(paired_shards, workers):
    batches = list(build_loader(loader_config(paired_shards, num_workers=workers)))
    assert len(batches) == 8
    for b in batches:
        assert b["gt"].shape == (4, 3, 48, 48) and b["gt"].dtype == torch.float32
        assert b["paired"].all() and b["type"] == ["invert"] * 4
        torch.testing.assert_close(b["lq"], 1.0 - b["gt"], atol=1e-6, rtol=0)
    crops = torch.cat([b["gt"] for b in batches])
    assert crops.std(dim=0).mean() > 0.05  # crops differ: the stream is not one repeated patch


def test_stream_is_reproducible_from_the_seed(paired_shards):
    def keys(seed):
        return [k for b in build_loader(loader_config(paired_shards, seed=seed)) for k in b["key"]]
    first = [b["gt"] for b in build_loader(loader_config(paired_shards, seed=3))]
    again = [b["gt"] for b in build_loader(loader_config(paired_shards, seed=3))]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert keys(3) != keys(4)


@pytest.mark.parametrize("workers", [0, 2])
def test_resuming_mid_epoch_continues_the_same_stream(paired_shards, workers):
    cfg = loader_config(paired_shards, num_workers=workers, samples_per_epoch=40)
    full = [b["key"] for b in build_loader(cfg, epoch=1)]
    rest = [b["key"] for b in build_loader(cfg, epoch=1, start_step=3)]
    assert len(full) == 10 and rest == full[3:]
    assert [b["key"] for b in build_loader(cfg, epoch=2)] != full


@pytest.mark.parametrize("workers", [0, 2])
def test_global_batches_are_the_same_at_any_number_of_ranks(paired_shards, workers):
    """4 micro-batches per step, cut over 1, 2 or 4 ranks, resumed mid-epoch or not: the same steps."""
    cfg = loader_config(paired_shards, num_workers=workers, samples_per_epoch=48)  # 3 steps of 4 x 4

    def steps(world: int, start: int = 0) -> list[list[str]]:
        ranks = [list(build_loader(cfg, epoch=1, start_step=start, plan=BatchPlan.for_rank(4, r, world)))
                 for r in range(world)]
        per_rank = 4 // world
        return [[k for batches in ranks for b in batches[s * per_rank:(s + 1) * per_rank] for k in b["key"]]
                for s in range(3 - start)]

    one = steps(1)
    assert len(one) == 3 and all(len(step) == 16 for step in one)
    assert steps(2) == one and steps(4) == one
    assert steps(2, start=1) == one[1:] and steps(4, start=2) == one[2:]
    with pytest.raises(ValueError, match="cannot be shared by 3 ranks; sizes that can: \\[1, 2, 4\\]"):
        BatchPlan.for_rank(4, 0, 3)


def test_clean_only_samples_are_flagged_for_synthesis(package_photos, tmp_path):
    build_shards(BuildConfig(output=str(tmp_path / "s"), sources=[SourceSpec("pkg", str(package_photos))],
                             max_side=128, progress=False))
    b = next(iter(build_loader(loader_config(tmp_path / "s"))))
    assert not b["paired"].any() and torch.equal(b["lq"], b["gt"]) and b["type"] == ["clean"] * 4


def _corrupt_copy(shards: Path, dest: Path) -> Path:
    """Copy a shard set, replacing one sample's image with garbage and truncating another shard."""
    import shutil

    shutil.copytree(shards, dest)
    tars = sorted(dest.glob("*.tar"))
    with tarfile.open(tars[0]) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]
    with tarfile.open(tars[0], "w", format=tarfile.PAX_FORMAT) as tar:
        for m, data in members:
            if m.name.endswith(".gt.png"):
                data = b"garbage, not a png" * 4
                m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    data = tars[1].read_bytes()
    tars[1].write_bytes(data[: len(data) // 3])
    return dest


def test_bad_samples_are_skipped_and_counted(paired_shards, tmp_path):
    bad = _corrupt_copy(paired_shards, tmp_path / "bad")
    cfg = loader_config(bad, samples_per_epoch=64, resample=False, shuffle_buffer=2)
    batches = list(build_loader(cfg))
    assert len(batches) == 16  # the epoch still has its full length
    skipped = sum(b["skipped"] for b in batches)
    assert skipped >= 2  # both gt images of the first shard, plus the truncated shard's losses
    for b in batches:
        torch.testing.assert_close(b["lq"], 1.0 - b["gt"], atol=1e-6, rtol=0)


def test_a_source_with_nothing_usable_fails_clearly(paired_shards, tmp_path):
    cfg = loader_config(paired_shards, patch_size=512)  # every sample is smaller than the patch
    with pytest.raises(RuntimeError, match="gave no usable sample"):
        next(iter(build_loader(cfg)))


def test_probability_mixture_follows_the_weights(paired_shards, package_photos, tmp_path):
    build_shards(BuildConfig(output=str(tmp_path / "clean"), sources=[SourceSpec("pkg", str(package_photos))],
                             max_side=96, progress=False))
    cfg = LoaderConfig(sources=[ShardSourceConfig(str(paired_shards), weight=3.0),
                                ShardSourceConfig(str(tmp_path / "clean"), weight=1.0)], weighting="probability",
                       patch_size=48, batch_size=8, samples_per_epoch=800, num_workers=0, shuffle_buffer=4)
    types = [t for b in build_loader(cfg) for t in b["type"]]
    share = types.count("invert") / len(types)
    assert 0.68 < share < 0.82  # 3:1 -> 0.75


def test_loader_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"key 'sources\[0\].weight' expects float"):
        from_dict(LoaderConfig, {"sources": [{"location": "x", "weight": "heavy"}]})
    with pytest.raises(ConfigError, match="unknown key 'batchsize'"):
        from_dict(LoaderConfig, {"sources": [{"location": "x"}], "batchsize": 3})
    with pytest.raises(ConfigError, match=r"key 'weighting' expects one of 'replicate', 'probability'"):
        from_dict(LoaderConfig, {"sources": [{"location": "x"}], "weighting": "proportional"})


def _rank_main(rank: int, world: int, sources: list, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg = LoaderConfig(sources=[ShardSourceConfig(s) for s in sources], patch_size=32, batch_size=3,
                       samples_per_epoch=60, num_workers=2, shuffle_buffer=4)
    count = 0
    for batch in build_loader(cfg):
        # A collective per batch, as in training: unequal batch counts would hang here.
        total = torch.tensor([batch["gt"].mean().item()])
        dist.all_reduce(total)
        count += 1
    dist.barrier()
    results[rank] = count
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_two_workers_uneven_shards_get_equal_batches(package_photos, tmp_path):
    from conftest import _free_port

    # Deliberately uneven: one shard of dozens of tiles beside shards of one sample each.
    photos = sorted(package_photos.iterdir())
    for name, chosen in (("big", photos[:1]), ("small", photos[1:5])):
        (tmp_path / name).mkdir()
        for p in chosen:
            img = Image.open(p).convert("RGB")
            img.thumbnail((160, 160))
            img.save(tmp_path / name / (p.stem + ".png"))
    big = build_shards(BuildConfig(output=str(tmp_path / "big_shards"), sources=[SourceSpec("big", str(tmp_path / "big"))],
                                   tile_size=40, tile_stride=20, progress=False))
    small = build_shards(BuildConfig(output=str(tmp_path / "small_shards"), sources=[SourceSpec("small", str(tmp_path / "small"))],
                                     max_samples_per_shard=1, progress=False))
    assert [s.samples for s in big.shards] == [big.total_samples] and big.total_samples >= 20
    assert [s.samples for s in small.shards] == [1, 1, 1, 1]

    manager = tmp_mp.Manager()
    results = manager.dict()
    sources = [str(tmp_path / "big_shards"), str(tmp_path / "small_shards")]
    tmp_mp.spawn(_rank_main, args=(2, sources, _free_port(), results), nprocs=2, join=True)
    assert dict(results) == {0: 10, 1: 10}  # 60 samples / (2 ranks x 3) on each rank
