"""Shards built to, verified on and streamed from a real S3 protocol server on loopback."""

from __future__ import annotations

import pytest
import torch

from dataset_tools.build import BuildConfig, build_shards
from dataset_tools.sources import SourceSpec
from dataset_tools.verify import verify
from perceive_ir.data.manifest import read_manifest
from perceive_ir.data.pipeline import LoaderConfig, ShardSourceConfig, build_loader
from perceive_ir.data.storage import StorageError, filesystem


def upload_photos(photos, bucket: str, options: dict, count: int):
    """Put the first ``count`` package photos under ``bucket/photos``; return the bucket's fs."""
    fs, _ = filesystem(bucket, options)
    for photo in sorted(photos.iterdir())[:count]:
        fs.put_file(str(photo), f"{bucket}/photos/{photo.name}")
    return fs


@pytest.mark.slow
def test_build_verify_and_stream_through_s3(package_photos, s3_bucket):
    bucket, options = s3_bucket
    fs = upload_photos(package_photos, bucket, options, 5)  # sources on S3 too: s3:// to s3://
    cfg = BuildConfig(output=f"{bucket}/shards", sources=[SourceSpec("pkg", f"{bucket}/photos", storage_options=options)],
                      max_side=160, max_samples_per_shard=2, workers=2, progress=False, storage_options=options)
    manifest = build_shards(cfg)
    assert manifest.total_samples == 5 and len(manifest.shards) == 3
    listed = sorted(p.rsplit("/", 1)[1] for p in fs.ls(f"{bucket}/shards"))
    assert listed == ["manifest.json", "shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert "endpoint_url" in manifest.args["storage_options"]  # recorded, while credentials never are
    assert not any("secret" in k.lower() or "key" == k.lower() for k in manifest.args["storage_options"])

    report = verify(f"{bucket}/shards", options, progress=False)
    assert report.ok and report.samples == 5
    assert read_manifest(f"{bucket}/shards/manifest.json", options).total_samples == 5

    loader = build_loader(LoaderConfig(sources=[ShardSourceConfig(f"{bucket}/shards")], patch_size=64,
                                       batch_size=4, samples_per_epoch=24, num_workers=2,
                                       storage_options=options))
    batches = list(loader)
    assert len(batches) == 6 and all(b["gt"].shape == (4, 3, 64, 64) for b in batches)
    assert all(b["skipped"] == 0 for b in batches)
    assert torch.cat([b["gt"] for b in batches]).std() > 0.05


@pytest.mark.slow
def test_plain_webdataset_reads_s3_through_the_registered_opener(package_photos, s3_bucket):
    import webdataset as wds

    from perceive_ir.data.storage import register_webdataset_opener

    bucket, options = s3_bucket
    upload_photos(package_photos, bucket, options, 3)
    build_shards(BuildConfig(output=f"{bucket}/shards", sources=[SourceSpec("pkg", f"{bucket}/photos", storage_options=options)],
                             max_samples_per_shard=2, progress=False, storage_options=options))
    register_webdataset_opener(options)
    dataset = wds.WebDataset(f"{bucket}/shards/shard-{{000000..000001}}.tar", shardshuffle=False)
    keys = [sample["__key__"] for sample in dataset]
    assert len(keys) == 3 and all(k.startswith("pkg/train/") for k in keys)


def test_file_urls_work_like_local_paths(package_photos, tmp_path):
    build_shards(BuildConfig(output=f"file://{tmp_path}/shards", sources=[SourceSpec("pkg", f"file://{package_photos}")],
                             max_side=96, progress=False))
    assert verify(f"file://{tmp_path}/shards", progress=False).ok
    batch = next(iter(build_loader(LoaderConfig(sources=[ShardSourceConfig(f"file://{tmp_path}/shards")],
                                                patch_size=48, batch_size=2, samples_per_epoch=2, num_workers=0))))
    assert batch["gt"].shape == (2, 3, 48, 48)


def test_an_unreachable_bucket_names_the_url(s3_endpoint):
    with pytest.raises(StorageError, match="s3://no-such-bucket/shards/manifest.json"):
        read_manifest("s3://no-such-bucket/shards", s3_endpoint)
