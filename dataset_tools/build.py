"""Build WebDataset shards from folders of images, resumable after a crash at any moment.

How a build stays exact across a ``kill -9``:
- the input list is deterministic (sources in order, files sorted, then a seeded shuffle) and
  so is every sample made from it, hence every shard boundary;
- a shard is written locally, then published atomically (rename on disk, a single PUT on
  object stores), so a half-written shard is never visible under its final name;
- after publishing shard N a small state file records where the input stands; a rerun
  continues after the last shard with a state file and rewrites anything after it.
The manifest is written last; its presence means the build is complete.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing as mp
import os
import random
import sys
import tarfile
import tempfile
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Iterator, Literal, Optional

import numpy as np
from PIL import Image
from tqdm import tqdm

from perceive_ir.config import to_dict
from perceive_ir.data import images
from perceive_ir.data.manifest import MANIFEST_NAME, Manifest, ShardEntry, SkippedEntry
from perceive_ir.data.pairing import describe_extensions
from perceive_ir.data.storage import (
    StorageError,
    filesystem,
    join,
    open_url,
    put_atomic,
    redact,
    storage_error,
    write_bytes_atomic,
)

from .sources import Item, SourceSpec, enumerate_source

STATE_DIR = ".build-state"
_TAR_BLOCK = 512
_TAR_RECORD = 20 * _TAR_BLOCK


@dataclass
class BuildConfig:
    output: str
    sources: list[SourceSpec]
    prefix: str = "shard"
    max_samples_per_shard: int = 1000
    max_bytes_per_shard: int = 1 << 30
    encode: Literal["keep", "png", "jpeg", "webp"] = "keep"
    quality: int = 95
    max_side: Optional[int] = None
    tile_size: Optional[int] = None
    tile_stride: Optional[int] = None
    min_size: int = 0
    dedup: bool = True
    shuffle: bool = True
    seed: int = 0
    workers: int = 1
    overwrite: bool = False
    progress: bool = True
    storage_options: dict[str, Any] = field(default_factory=dict)
    # Relative source folders are under data_root (a local folder or URL); absolute ones are kept.
    data_root: Optional[str] = None
    # dataset name -> the number of images (clean sources) or pairs (paired sources) its sources must
    # yield after pairing; checked before anything is written. expect={} turns the check off.
    expect: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.sources:
            raise ValueError("at least one source is needed")
        if self.data_root:
            for src in self.sources:
                src.clean = _under(self.data_root, src.clean)
                if src.degraded:
                    src.degraded = _under(self.data_root, src.degraded)
        unknown = sorted(set(self.expect) - {s.dataset for s in self.sources})
        if unknown:
            raise ValueError(f"expect names datasets no source has: {unknown} "
                             f"(sources: {sorted({s.dataset for s in self.sources})})")
        if self.max_samples_per_shard < 1 or self.max_bytes_per_shard < 1:
            raise ValueError("max_samples_per_shard and max_bytes_per_shard must be positive")
        if self.tile_stride is not None and self.tile_size is None:
            raise ValueError("tile_stride needs tile_size")
        if self.tile_size is not None and self.tile_size < 1:
            raise ValueError("tile_size must be positive")
        if self.workers < 1:
            raise ValueError("workers must be at least 1")

    def identity(self) -> dict[str, Any]:
        """The arguments that decide the output (not how fast it is made); secrets removed."""
        args = to_dict(self)
        # data_root is in the sources' folders; expect does not change the output.
        for transient in ("workers", "overwrite", "progress", "data_root", "expect"):
            args.pop(transient)
        args["storage_options"] = redact(self.storage_options)
        for src in args["sources"]:
            src["storage_options"] = redact(src["storage_options"])
            # Left out at their defaults: sets built before these settings existed keep their identity.
            for name, default in (("across_folders", False), ("exclude", [])):
                if src[name] == default:
                    src.pop(name)
        return args


def _under(root: str, location: str) -> str:
    if "://" in location or os.path.isabs(location):
        return location
    return join(root, location) if "://" in root else os.path.join(os.path.abspath(root), location)


@dataclass
class Sample:
    key: str
    files: dict[str, bytes]  # member suffix ("gt.png", "lq.jpg", "json") -> content
    type: str

    @property
    def tar_bytes(self) -> int:
        size = 0
        for suffix, data in self.files.items():
            header = _TAR_BLOCK * (3 if len(self.key) + len(suffix) + 1 > 99 else 1)  # PAX for long names
            size += header + -(-len(data) // _TAR_BLOCK) * _TAR_BLOCK
        return size


@dataclass
class ItemResult:
    samples: list[Sample]
    image_hash: Optional[str] = None
    skip_reason: Optional[str] = None


# ---------------------------------------------------------------------------- per-item work


def _tile_origins(length: int, tile: int, stride: int) -> list[int]:
    if length <= tile:
        return [0]
    origins = list(range(0, length - tile + 1, stride))
    if origins[-1] != length - tile:
        origins.append(length - tile)  # cover the border, as sub-image extraction does
    return origins


def _resize_max_side(arr: np.ndarray, max_side: Optional[int]) -> np.ndarray:
    h, w = arr.shape[:2]
    if not max_side or max(h, w) <= max_side:
        return arr
    scale = max_side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(arr).resize(size, Image.Resampling.LANCZOS))


def _encode(arr: np.ndarray, original: bytes, fmt: Optional[str], modified: bool, cfg: dict) -> tuple[str, bytes]:
    if cfg["encode"] == "keep":
        if not modified and fmt in images.LOADER_FORMATS:
            return images.LOADER_FORMATS[fmt], original
        return "png", images.encode(arr, "png")
    ext = "jpg" if cfg["encode"] == "jpeg" else cfg["encode"]
    return ext, images.encode(arr, cfg["encode"], cfg["quality"])


def process_item(item: Item, cfg: dict) -> ItemResult:
    """Read, decode, convert, check, resize, tile and encode one item. Runs in worker processes."""
    decoded = {}
    for role, url, rel in (("gt", item.clean_url, item.clean_rel), ("lq", item.degraded_url, item.degraded_rel)):
        if url is None:
            continue
        try:
            with open_url(url, "rb", item.storage_options) as f:
                data = f.read()
        except (StorageError, OSError) as err:
            return ItemResult([], skip_reason=f"unreadable {role} file '{rel}': {err}")
        try:
            arr, fmt = images.decode_rgb8(data, rel)
        except images.ImageDecodeError as err:
            return ItemResult([], skip_reason=f"corrupt {role} image: {err}")
        decoded[role] = (arr, fmt, data)

    shapes = {role: v[0].shape for role, v in decoded.items()}
    if len(set(shapes.values())) > 1:
        return ItemResult([], skip_reason=f"pair sizes differ: {shapes}")
    h, w = decoded["gt"][0].shape[:2]
    if min(h, w) < cfg["min_size"]:
        return ItemResult([], skip_reason=f"smaller than min_size {cfg['min_size']}: {h}x{w}")
    image_hash = images.pixel_hash(*(decoded[r][0] for r in sorted(decoded)))
    # The clean image's identity, shared by all its degraded versions and tiles: the medium tier's
    # folds hang on it. Decoded pixels, so renaming or lossless re-encoding does not change it.
    clean_hash = images.pixel_hash(decoded["gt"][0]) if "lq" in decoded else image_hash

    resized = {r: _resize_max_side(v[0], cfg["max_side"]) for r, v in decoded.items()}
    h, w = resized["gt"].shape[:2]
    tile = cfg["tile_size"]
    stride = cfg["tile_stride"] or tile
    if tile:
        origins = [(y, x) for y in _tile_origins(h, tile, stride) for x in _tile_origins(w, tile, stride)]
    else:
        origins = [(0, 0)]
    single = len(origins) == 1

    samples = []
    for y, x in origins:
        crops = {r: (a if single else a[y : y + tile, x : x + tile]) for r, a in resized.items()}
        modified = not single or resized["gt"].shape != decoded["gt"][0].shape
        key = item.key if single else f"{item.key}_y{y}_x{x}"
        # Metadata first: a reader of a truncated shard still knows what a cut-off sample was.
        files: dict[str, bytes] = {"json": b""}
        for role, arr in crops.items():
            _, fmt, original = decoded[role]
            ext, payload = _encode(arr, original, fmt, modified, cfg)
            files[f"{role}.{ext}"] = payload
        ch, cw = crops["gt"].shape[:2]
        meta = {
            "key": key,
            "source": item.source,
            "dataset": item.dataset,
            "split": item.split,
            "type": item.type,
            "size": [ch, cw],
            "sha256": images.pixel_hash(*(crops[r] for r in sorted(crops))),
            "image_sha256": image_hash,
            "clean_sha256": clean_hash,
            "tile": None if single else [y, x],
        }
        files["json"] = json.dumps(meta, sort_keys=True).encode()
        samples.append(Sample(key, files, item.type))
    return ItemResult(samples, image_hash)


# ---------------------------------------------------------------------------- shard writing


class _ShardWriter:
    """Writes one tar at a time into a local temporary file, with reproducible headers."""

    def __init__(self, tmpdir: str) -> None:
        self.tmpdir = tmpdir
        self.tar: Optional[tarfile.TarFile] = None
        self.path = ""
        self.count = 0

    def open(self, index: int) -> None:
        self.path = os.path.join(self.tmpdir, f"{index:06d}.tar")
        self.tar = tarfile.open(self.path, "w", format=tarfile.PAX_FORMAT)
        self.count = 0

    def projected_size(self, sample: Sample) -> int:
        end = self.tar.fileobj.tell() + sample.tar_bytes + 2 * _TAR_BLOCK
        return -(-end // _TAR_RECORD) * _TAR_RECORD

    def add(self, sample: Sample) -> None:
        for suffix, data in sample.files.items():
            info = tarfile.TarInfo(f"{sample.key}.{suffix}")
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o644
            self.tar.addfile(info, io.BytesIO(data))
        self.count += 1

    def close(self) -> tuple[str, int, str]:
        self.tar.close()
        self.tar = None
        digest = hashlib.sha256()
        with open(self.path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return self.path, os.path.getsize(self.path), digest.hexdigest()


@dataclass
class _Progress:
    """Build position and what has been published so far; persisted after each shard."""

    shards: list[ShardEntry] = field(default_factory=list)
    skipped: list[SkippedEntry] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    seen: set[str] = field(default_factory=set)
    next_item: int = 0
    next_sample: int = 0  # samples of item next_item already published (tiles may span shards)


def _state_name(prefix: str, index: int) -> str:
    return f"{STATE_DIR}/{prefix}-{index:06d}.json"


def _load_progress(out_fs, out_root: str, cfg: BuildConfig, digest: str, inputs: str) -> _Progress:
    progress = _Progress()
    index = 0
    while True:
        path = f"{out_root}/{_state_name(cfg.prefix, index)}"
        if not out_fs.exists(path):
            return progress
        state = json.loads(out_fs.cat_file(path))
        if state["args_digest"] != digest:
            raise RuntimeError(
                f"'{cfg.output}' holds an unfinished build made with other arguments; "
                "rerun with the same arguments to resume it, or pass overwrite=true to start over"
            )
        if state.get("inputs_digest") != inputs:
            raise RuntimeError(
                f"'{cfg.output}' holds an unfinished build of other input files (files were added, "
                "removed or renamed since); pass overwrite=true to start over"
            )
        progress.shards.append(ShardEntry(**state["shard"]))
        progress.skipped.extend(SkippedEntry(**s) for s in state["skipped"])
        for k, v in state["counts"].items():
            progress.counts[k] = progress.counts.get(k, 0) + v
        progress.seen.update(state["hashes"])
        progress.next_item, progress.next_sample = state["next_item"], state["next_sample"]
        index += 1


def _args_digest(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def _inputs_digest(items: list[Item]) -> str:
    """The input list in build order: a resume is exact only over the same files."""
    return hashlib.sha256("\n".join(i.source for i in items).encode()).hexdigest()


def _clear_output(out_fs, out_root: str, prefix: str) -> None:
    for path in out_fs.glob(f"{out_root}/{prefix}-*.tar") + [f"{out_root}/{MANIFEST_NAME}"]:
        if out_fs.exists(path):
            out_fs.rm_file(path)
    if out_fs.exists(f"{out_root}/{STATE_DIR}"):
        out_fs.rm(f"{out_root}/{STATE_DIR}", recursive=True)


def _results(items: list[Item], cfg: BuildConfig) -> Iterator[ItemResult]:
    worker_cfg = {k: getattr(cfg, k) for k in ("encode", "quality", "max_side", "tile_size", "tile_stride", "min_size")}
    work = partial(process_item, cfg=worker_cfg)
    if cfg.workers == 1 or len(items) < 2:
        yield from map(work, items)
        return
    # fork starts workers at once; fsspec resets its event loop and instance cache in a
    # forked child, so s3fs/gcsfs are safe there. Elsewhere use the platform default.
    method = "fork" if "fork" in mp.get_all_start_methods() else None
    with mp.get_context(method).Pool(cfg.workers) as pool:
        yield from pool.imap(work, items, chunksize=1)


def _source_folders(spec: SourceSpec) -> str:
    return f"'{spec.degraded}' and '{spec.clean}'" if spec.degraded else f"'{spec.clean}'"


def collect_items(cfg: BuildConfig) -> tuple[list[Item], list[SkippedEntry]]:
    """The build's items (pairing done, nothing decoded) and the files skipped while pairing.

    A source that yields nothing, and a dataset whose count differs from ``cfg.expect``, is an error
    naming the folders and the extensions looked for.
    """
    items: list[Item] = []
    skipped: list[SkippedEntry] = []
    counts: dict[str, int] = {}
    for spec in cfg.sources:
        found, unpaired = enumerate_source(spec)
        if not found:
            what = f"no pairs by rule {spec.rule().describe()}" if spec.degraded else "no image files"
            raise RuntimeError(f"source '{spec.dataset}': {what} in {_source_folders(spec)} "
                               f"(extensions looked for: {describe_extensions()}; {len(unpaired)} files skipped)")
        counts[spec.dataset] = counts.get(spec.dataset, 0) + len(found)
        items.extend(found)
        skipped.extend(SkippedEntry(src, reason) for src, reason in unpaired)
    for dataset, expected in cfg.expect.items():
        if counts[dataset] != expected:
            folders = ", ".join(_source_folders(s) for s in cfg.sources if s.dataset == dataset)
            kind = "pairs" if any(s.degraded for s in cfg.sources if s.dataset == dataset) else "images"
            raise RuntimeError(
                f"dataset '{dataset}': {counts[dataset]} {kind} found in {folders}, {expected} expected "
                f"(extensions looked for: {describe_extensions()}; {len(skipped)} files skipped while pairing, "
                f"e.g. {[s.source for s in skipped[:3]]}); pass expect.{dataset}=N or expect={{}} for another copy"
            )
    if cfg.shuffle:
        random.Random(cfg.seed).shuffle(items)
    return items, skipped


def build_shards(cfg: BuildConfig) -> Manifest:
    """Build (or resume, or confirm) the shard set that ``cfg`` describes."""
    out_fs, out_root = filesystem(cfg.output, cfg.storage_options)
    out_root = out_root.rstrip("/")
    identity = cfg.identity()
    digest = _args_digest(identity)
    manifest_path = f"{out_root}/{MANIFEST_NAME}"

    try:
        finished = out_fs.exists(manifest_path)
    except Exception as err:  # noqa: BLE001 - an unreachable store raises many kinds
        raise storage_error(cfg.output, err, "reach the output folder") from err
    if cfg.overwrite:
        _clear_output(out_fs, out_root, cfg.prefix)
    elif finished:
        existing = Manifest.from_json(out_fs.cat_file(manifest_path).decode(), join(cfg.output, MANIFEST_NAME))
        if _args_digest(existing.args) == digest:
            print(f"{cfg.output}: already complete ({existing.total_samples} samples)", file=sys.stderr)
            return existing
        raise RuntimeError(
            f"'{cfg.output}' already holds shards built with other arguments; "
            "choose another output or pass overwrite=true"
        )

    items, pairing_skips = collect_items(cfg)
    if not items:
        raise RuntimeError(f"no images found in the sources of '{cfg.output}'")
    inputs = _inputs_digest(items)
    progress = _load_progress(out_fs, out_root, cfg, digest, inputs)
    resumed_from = progress.next_item
    out_fs.makedirs(f"{out_root}/{STATE_DIR}", exist_ok=True)

    pending_hashes: list[str] = []
    pending_skips: list[SkippedEntry] = []
    pending_counts: dict[str, int] = {}

    with tempfile.TemporaryDirectory(prefix="shards-") as tmpdir:
        writer = _ShardWriter(tmpdir)

        def publish(next_item: int, next_sample: int) -> None:
            index = len(progress.shards)
            local, size, sha = writer.close()
            name = f"{cfg.prefix}-{index:06d}.tar"
            put_atomic(out_fs, local, f"{out_root}/{name}")
            os.remove(local)
            entry = ShardEntry(name, writer.count, size, sha)
            state = {
                "args_digest": digest,
                "inputs_digest": inputs,
                "shard": entry.__dict__,
                "skipped": [s.__dict__ for s in pending_skips],
                "counts": pending_counts,
                "hashes": pending_hashes,
                "next_item": next_item,
                "next_sample": next_sample,
            }
            write_bytes_atomic(out_fs, f"{out_root}/{_state_name(cfg.prefix, index)}", json.dumps(state).encode())
            progress.shards.append(entry)
            progress.skipped.extend(pending_skips)
            for k, v in pending_counts.items():
                progress.counts[k] = progress.counts.get(k, 0) + v
            pending_hashes.clear()
            pending_skips.clear()
            pending_counts.clear()

        bar = tqdm(
            total=len(items), initial=resumed_from, desc="building shards", unit="img",
            disable=not cfg.progress, file=sys.stderr,
        )
        for offset, result in enumerate(_results(items[resumed_from:], cfg)):
            index = resumed_from + offset
            bar.update(1)
            item = items[index]
            first = progress.next_sample if offset == 0 else 0
            if result.skip_reason:
                pending_skips.append(SkippedEntry(item.source, result.skip_reason))
                continue
            # An item resumed part-way (first > 0) passed the duplicate check before the crash.
            check_duplicate = first == 0 and cfg.dedup
            if check_duplicate and result.image_hash in progress.seen:
                pending_skips.append(SkippedEntry(item.source, "duplicate content (same pixels as an earlier image)"))
                continue
            for n, sample in enumerate(result.samples[first:], start=first):
                if writer.tar is not None and writer.count and (
                    writer.count >= cfg.max_samples_per_shard
                    or writer.projected_size(sample) > cfg.max_bytes_per_shard
                ):
                    publish(index, n)
                if writer.tar is None:
                    writer.open(len(progress.shards))
                if check_duplicate and n == 0:
                    # Recorded with the shard that holds the item's first sample, so that a
                    # resume from a boundary just before this item checks it again.
                    progress.seen.add(result.image_hash)
                    pending_hashes.append(result.image_hash)
                writer.add(sample)
                label = f"{item.dataset}/{item.split}/{item.type}"
                pending_counts[label] = pending_counts.get(label, 0) + 1
            bar.set_postfix(shards=len(progress.shards), skipped=len(progress.skipped) + len(pending_skips))
        if writer.tar is not None:
            publish(len(items), 0)
        bar.close()

    manifest = Manifest(
        shards=progress.shards,
        skipped=pairing_skips + progress.skipped + pending_skips,
        args=identity,
        counts=dict(sorted(progress.counts.items())),
    )
    write_bytes_atomic(out_fs, manifest_path, manifest.to_json().encode())
    out_fs.rm(f"{out_root}/{STATE_DIR}", recursive=True)
    return manifest
