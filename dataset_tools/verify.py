"""Check a shard set against its manifest: presence, size, checksum, sample count, decodability."""

from __future__ import annotations

import hashlib
import io
import sys
import tarfile
from dataclasses import dataclass, field
from typing import Any, Mapping

from tqdm import tqdm

from perceive_ir.data.images import SHARD_IMAGE_SUFFIXES, ImageDecodeError, decode_rgb8
from perceive_ir.data.manifest import read_manifest, shard_urls
from perceive_ir.data.storage import StorageError, open_url


@dataclass
class VerifyReport:
    shards: int = 0
    samples: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _check_shard(url: str, expected, decode: bool, options) -> tuple[int, list[str]]:
    try:
        with open_url(url, "rb", options) as f:
            data = f.read()
    except StorageError as err:
        return 0, [f"{url}: {err}"]
    problems = []
    if len(data) != expected.bytes:
        problems.append(f"{url}: {len(data)} bytes, manifest says {expected.bytes}")
    if hashlib.sha256(data).hexdigest() != expected.sha256:
        problems.append(f"{url}: sha256 differs from the manifest (modified or corrupt)")
    keys: set[str] = set()
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                folder, _, base = member.name.rpartition("/")
                stem, _, suffix = base.partition(".")  # WebDataset: the key ends at the first dot
                keys.add(f"{folder}/{stem}")
                if decode and suffix.rsplit(".", 1)[-1] in SHARD_IMAGE_SUFFIXES:
                    try:
                        decode_rgb8(tar.extractfile(member).read(), member.name)
                    except ImageDecodeError as err:
                        problems.append(f"{url}: sample does not decode: {err}")
    except tarfile.TarError as err:
        problems.append(f"{url}: not a readable tar ({err})")
    if len(keys) != expected.samples:
        problems.append(f"{url}: {len(keys)} samples, manifest says {expected.samples}")
    return len(keys), problems


def verify(location: str, storage_options: Mapping[str, Any] | None = None, decode: bool = True,
           progress: bool = True) -> VerifyReport:
    manifest = read_manifest(location, storage_options)
    report = VerifyReport()
    urls = shard_urls(location, manifest)
    for url, entry in tqdm(list(zip(urls, manifest.shards)), desc="verifying shards", unit="shard",
                           disable=not progress, file=sys.stderr):
        count, problems = _check_shard(url, entry, decode, storage_options)
        report.shards += 1
        report.samples += count
        report.problems.extend(problems)
    return report
