"""The JSON manifest written next to a shard set: the contract between builder, verifier and loader."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

from .storage import StorageError, join, open_url, parent

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1


@dataclass
class ShardEntry:
    name: str  # file name relative to the manifest's folder
    samples: int
    bytes: int
    sha256: str


@dataclass
class SkippedEntry:
    source: str  # dataset/split and the file's path relative to its source root
    reason: str


@dataclass
class Manifest:
    shards: list[ShardEntry]
    skipped: list[SkippedEntry] = field(default_factory=list)
    args: dict[str, Any] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)  # by "dataset/split/type"
    version: int = MANIFEST_VERSION

    @property
    def total_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def total_bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    def to_json(self) -> str:
        body = asdict(self)
        body["totals"] = {
            "shards": len(self.shards),
            "samples": self.total_samples,
            "bytes": self.total_bytes,
            "skipped": len(self.skipped),
        }
        return json.dumps(body, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str = "<manifest>") -> "Manifest":
        try:
            body = json.loads(text)
            return cls(
                shards=[ShardEntry(**s) for s in body["shards"]],
                skipped=[SkippedEntry(**s) for s in body.get("skipped", [])],
                args=body.get("args", {}),
                counts=body.get("counts", {}),
                version=body.get("version", MANIFEST_VERSION),
            )
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{where}: not a valid shard manifest ({type(err).__name__}: {err})") from None


def manifest_url(location: str) -> str:
    """Accept either the manifest's URL or the folder that holds it."""
    return location if location.endswith(".json") else join(location, MANIFEST_NAME)


def read_manifest(location: str, storage_options: Mapping[str, Any] | None = None) -> Manifest:
    url = manifest_url(location)
    try:
        with open_url(url, "rb", storage_options) as f:
            text = f.read().decode()
    except StorageError as err:
        raise StorageError(f"no shard manifest: {err}") from None
    return Manifest.from_json(text, url)


def shard_urls(location: str, manifest: Manifest) -> list[str]:
    """Full URLs of a manifest's shards."""
    folder = parent(manifest_url(location))
    return [join(folder, s.name) for s in manifest.shards]

