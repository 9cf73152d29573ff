"""Summarise a shard set: counts by dataset, split and type, and a histogram of image sizes."""

from __future__ import annotations

import io
import json
import sys
import tarfile
from collections import Counter
from typing import Any, Mapping

from tqdm import tqdm

from perceive_ir.data.manifest import read_manifest, shard_urls
from perceive_ir.data.storage import open_url

SIZE_BINS = (64, 128, 256, 512, 1024, 2048, 4096)


def _size_bin(short_side: int) -> str:
    lower = 0
    for edge in SIZE_BINS:
        if short_side < edge:
            return f"{lower}-{edge - 1}"
        lower = edge
    return f">={SIZE_BINS[-1]}"


def inspect(location: str, storage_options: Mapping[str, Any] | None = None, progress: bool = True) -> dict:
    """Read every sample's metadata (not its pixels) and count."""
    manifest = read_manifest(location, storage_options)
    by_label: Counter = Counter()
    by_size: Counter = Counter()
    for url in tqdm(shard_urls(location, manifest), desc="inspecting shards", unit="shard",
                    disable=not progress, file=sys.stderr):
        with open_url(url, "rb", storage_options) as f, tarfile.open(fileobj=io.BytesIO(f.read()), mode="r:") as tar:
            for member in tar:
                if member.isfile() and member.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(member).read())
                    by_label[(meta["dataset"], meta["split"], meta["type"])] += 1
                    by_size[_size_bin(min(meta["size"]))] += 1
    return {
        "shards": len(manifest.shards),
        "samples": sum(by_label.values()),
        "bytes": manifest.total_bytes,
        "skipped": len(manifest.skipped),
        "counts": {"/".join(k): v for k, v in sorted(by_label.items())},
        "short_side_histogram": dict(sorted(by_size.items(), key=lambda kv: int(kv[0].strip(">=").split("-")[0]))),
    }


def format_report(summary: dict) -> str:
    lines = [
        f"shards {summary['shards']}  samples {summary['samples']}  "
        f"bytes {summary['bytes']:,}  skipped at build {summary['skipped']}",
        "",
        f"{'dataset/split/type':<40} {'samples':>8}",
    ]
    lines += [f"{label:<40} {n:>8}" for label, n in summary["counts"].items()]
    lines += ["", f"{'short side (px)':<16} {'samples':>8}"]
    top = max(summary["short_side_histogram"].values(), default=1)
    for label, n in summary["short_side_histogram"].items():
        lines.append(f"{label:<16} {n:>8} {'#' * max(1, round(30 * n / top))}")
    return "\n".join(lines)
