"""The training data path: WebDataset shards over fsspec -> aligned random crops -> batches.

Guarantees the training loop relies on:
- an epoch is a fixed number of global batches, each cut into micro-batch slots (see
  ``BatchPlan``); every rank gets exactly its slots of every step, whatever the shard sizes
  (each lane draws from an endless shard stream), so uneven shards never leave one rank waiting
  in a collective;
- the stream is a function of (seed, epoch, slot, lane) and never of the number of ranks: a run
  resized between steps sees the same samples at the same steps, none twice, none skipped;
- a corrupt shard or sample is skipped, never fatal; each batch carries ``skipped``, the
  number of samples its lane dropped since its previous batch, for the loop to log.

Source mixture (``weighting``): ``replicate`` (the paper's resampling ratios) treats each
source's ``weight`` as a replication factor of its dataset, so its share of the samples is
weight x samples / sum(weight x samples); ``probability`` makes the weights themselves the
shares; ``balanced`` gives every source the same share (task-balanced sampling where each source
is one task, as in the recipes). ``source_shares`` computes them, as the job prints and logs them
at start.

Every sample carries ``clean_id``, the identity of its clean source image (see
``clean_identity``): the medium tier's folds hang on it, never on the key of a degraded
version or a tile.

Shard order: with ``resample: true`` (training) every lane draws shards at random, weighted by
their sample counts, so small shards are not over-sampled; with ``resample: false`` shards are
partitioned across the lanes and visited in a seeded order, cycling when a partition runs out
before its share of batches.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal, Optional

import braceexpand
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.io import ImageReadMode, decode_image
from webdataset.tariterators import group_by_keys, tar_file_expander

from .images import SHARD_IMAGE_SUFFIXES
from .manifest import read_manifest, shard_urls
from .storage import StorageError, open_url

log = logging.getLogger(__name__)


@dataclass
class ShardSourceConfig:
    location: str  # a shard folder or its manifest.json, or a brace pattern of .tar URLs
    weight: float = 1.0  # replication factor, or mixture probability (see LoaderConfig.weighting)
    name: Optional[str] = None
    samples: Optional[int] = None  # size of a brace-pattern source (no manifest to read it from)

    def __post_init__(self) -> None:
        if self.weight <= 0:
            raise ValueError(f"source '{self.location}': weight must be positive")
        if self.samples is not None and self.samples < 1:
            raise ValueError(f"source '{self.location}': samples must be positive")


@dataclass
class LoaderConfig:
    sources: list[ShardSourceConfig]
    patch_size: int = 256
    batch_size: int = 8  # per micro-batch (one per rank and step, or several under accumulation)
    samples_per_epoch: int = 1024  # over all ranks
    num_workers: int = 2
    shuffle_buffer: int = 128
    flips: bool = True
    resample: bool = True
    weighting: Literal["replicate", "probability", "balanced"] = "replicate"
    seed: int = 0
    storage_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.sources:
            raise ValueError("the loader needs at least one source")
        for name in ("patch_size", "batch_size", "samples_per_epoch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive")
        if self.num_workers < 0 or self.shuffle_buffer < 1:
            raise ValueError("num_workers must be >= 0 and shuffle_buffer >= 1")


@dataclass
class _ResolvedSource:
    name: str
    urls: list[str]
    counts: list[int]  # samples per shard (1 each when unknown)
    weight: float
    samples: Optional[int]  # total samples; None for a brace pattern without a given size


def resolve_source(src: ShardSourceConfig, storage_options: dict) -> _ResolvedSource:
    """Turn a manifest or a brace pattern into shard URLs with their sample counts."""
    name = src.name or src.location
    if src.location.endswith(".tar") or "{" in src.location:
        urls = list(braceexpand.braceexpand(src.location))
        counts = [1] * len(urls)
        samples = src.samples
    else:
        if src.samples is not None:
            raise ValueError(f"source '{name}': 'samples' is for brace patterns only; "
                             "a shard folder's size comes from its manifest")
        manifest = read_manifest(src.location, storage_options)
        urls = shard_urls(src.location, manifest)
        counts = [s.samples for s in manifest.shards]
        samples = sum(counts)
    if not urls or sum(counts) == 0:
        raise ValueError(f"source '{src.location}' has no samples")
    return _ResolvedSource(name, urls, counts, src.weight, samples)


@dataclass
class SourceShare:
    name: str
    samples: Optional[int]  # None: unknown (a brace pattern under weighting: probability)
    weight: float
    share: float  # the expected fraction of training samples drawn from this source


def _shares(sources: list[_ResolvedSource], weighting: str) -> list[float]:
    if weighting == "balanced":
        return [1.0 / len(sources)] * len(sources)
    if weighting == "probability" or len(sources) == 1:
        masses = [s.weight for s in sources]
    else:
        for s in sources:
            if s.samples is None:
                raise ValueError(
                    f"source '{s.name}': weighting 'replicate' needs the source's size, and a brace "
                    "pattern has no manifest to read it from; point the source at its shard folder, "
                    "give 'samples: N' for it, or set weighting: probability"
                )
        masses = [s.weight * s.samples for s in sources]
    total = sum(masses)
    return [m / total for m in masses]


def source_shares(cfg: LoaderConfig) -> list[SourceShare]:
    """Each source's name, size, weight and resulting share of the stream (reads the manifests)."""
    sources = [resolve_source(s, cfg.storage_options) for s in cfg.sources]
    return [SourceShare(s.name, s.samples, s.weight, share)
            for s, share in zip(sources, _shares(sources, cfg.weighting))]


def format_shares(shares: list[SourceShare], weighting: str) -> str:
    """A small text table of :func:`source_shares` for the job's start-up output."""
    rows = [(s.name, "?" if s.samples is None else str(s.samples), f"{s.weight:g}", f"{100 * s.share:.2f}%")
            for s in shares]
    header = ("source", "samples", "weight", "share")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(4)]

    def line(cells) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([f"training sources (weighting: {weighting})", line(header)] + [line(r) for r in rows])


@dataclass
class PhaseLoader:
    """What a training phase changes in the training stream (stage 1's restorers and prompts): unset
    fields keep ``data.train``'s."""

    patch_size: Optional[int] = None
    batch_size: Optional[int] = None
    weighting: Optional[Literal["replicate", "probability", "balanced"]] = None

    def __post_init__(self) -> None:
        for name in ("patch_size", "batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be positive, got {value}")

    def apply(self, loader: LoaderConfig) -> LoaderConfig:
        changes = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
        return dataclasses.replace(loader, **changes) if changes else loader


@dataclass
class LoaderPhase:
    """The training stream from ``first_step`` on (until the next phase's first step)."""

    first_step: int
    loader: LoaderConfig
    name: str = "train"


_TILE_SUFFIX = re.compile(r"_y\d+_x\d+$")
_weak_identity_warned: set[str] = set()


def clean_identity(meta: dict, key: str) -> str:
    """The identity of a sample's clean source image: equal for every degraded version and every
    tile of one clean image. Shards record it as ``clean_sha256`` (the decoded clean pixels' hash);
    older shards get the best identity their metadata allows, with a warning where it is weaker."""
    if meta.get("clean_sha256"):
        return meta["clean_sha256"]
    # Older shards: the whole image's hash (shared by its tiles), else the key without its tile.
    fallback = meta.get("image_sha256") or _TILE_SUFFIX.sub("", key)
    if meta.get("type", "clean") == "clean":
        return fallback  # a clean-only sample: that hash or key names the clean image itself
    dataset = meta.get("dataset", "?")
    if dataset not in _weak_identity_warned:
        _weak_identity_warned.add(dataset)
        log.warning(
            "dataset '%s': shards without clean identities (built before 'clean_sha256' was recorded); "
            "folds follow each degraded image instead, so several degraded versions of one clean image "
            "can reach both hold-out restorers; rebuild the shards to fix this", dataset)
    return fallback


class _SkipCounter:
    """A webdataset error handler that counts and continues (one per loader worker)."""

    def __init__(self) -> None:
        self.count = 0
        self._logged = 0

    def __call__(self, exn: Exception) -> bool:
        self.count += 1
        if self._logged < 5:  # say what is wrong without flooding the log
            log.warning("skipping bad shard data: %s", exn)
            self._logged += 1
        return True


# torchvision 0.29 announces a move of its codecs to torchcodec; they remain the fastest here.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision")


def _decode(data: bytes) -> torch.Tensor:
    return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)


def _image_fields(sample: dict) -> tuple[Optional[bytes], Optional[bytes]]:
    gt = lq = None
    for suffix, value in sample.items():
        role, _, ext = suffix.partition(".")
        if ext in SHARD_IMAGE_SUFFIXES:
            if role == "gt":
                gt = value
            elif role == "lq":
                lq = value
    return gt, lq


@dataclass(frozen=True)
class BatchPlan:
    """How each global batch is cut, and which part of it this rank makes.

    A global batch is ``slots`` micro-batches of ``LoaderConfig.batch_size`` samples; slot ``k`` of
    step ``s`` is the same samples whatever the number of ranks, because it is drawn from lane
    ``(k, s mod loader workers)``, a stream seeded by ``(seed, epoch, k, lane)`` alone. A rank takes
    ``per_rank`` consecutive slots from ``first_slot`` (its gradient-accumulation micro-batches), so
    a run resized from 2 ranks to 1 (and back) trains on exactly the same global batches, in order.
    """

    slots: int = 1
    first_slot: int = 0
    per_rank: int = 1

    @classmethod
    def for_rank(cls, slots: int, rank: int, world_size: int) -> "BatchPlan":
        if world_size < 1 or slots % world_size:
            raise ValueError(f"{slots} micro-batches per global batch cannot be shared by {world_size} ranks; "
                             f"sizes that can: {divisors(slots)}")
        per_rank = slots // world_size
        return cls(slots, rank * per_rank, per_rank)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


class ShardStream(IterableDataset):
    """Batches of aligned random crops from a weighted mixture of shard sets: this rank's slots of
    every global batch of one epoch (see :class:`BatchPlan`)."""

    def __init__(self, cfg: LoaderConfig, rank: Optional[int] = None, world_size: Optional[int] = None,
                 plan: Optional[BatchPlan] = None):
        super().__init__()
        if plan is None:
            if rank is None or world_size is None:
                rank, world_size = _dist_rank_world()
            plan = BatchPlan.for_rank(world_size, rank, world_size)  # one micro-batch per rank and step
        self.cfg, self.plan = cfg, plan
        self.epoch = 0
        self.start_step = 0
        self.sources = [resolve_source(s, cfg.storage_options) for s in cfg.sources]
        self.probs = np.array(_shares(self.sources, cfg.weighting))
        self.lanes_per_slot = max(1, cfg.num_workers)
        self.steps_per_epoch = cfg.samples_per_epoch // (plan.slots * cfg.batch_size)
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"samples_per_epoch {cfg.samples_per_epoch} is less than one global batch of "
                f"{plan.slots} x {cfg.batch_size} samples"
            )
        if not cfg.resample:
            lanes = plan.slots * self.lanes_per_slot
            for s in self.sources:
                if len(s.urls) < lanes:
                    raise ValueError(
                        f"source '{s.name}' has {len(s.urls)} shards, too few to partition over "
                        f"{plan.slots} micro-batches x {self.lanes_per_slot} loader workers; set resample: true"
                    )

    @property
    def batches_per_rank(self) -> int:
        return self.steps_per_epoch * self.plan.per_rank

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Select the epoch, and the step in it to start from (to resume mid-epoch exactly)."""
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"start step {start_step} outside the epoch's {self.steps_per_epoch} steps")
        self.epoch = epoch
        self.start_step = start_step

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * self.plan.per_rank

    def _shard_sequence(self, src: _ResolvedSource, rng: np.random.Generator, lane: int, lanes: int) -> Iterator[str]:
        if self.cfg.resample:
            p = np.asarray(src.counts, dtype=np.float64)
            p /= p.sum()
            while True:
                yield src.urls[rng.choice(len(src.urls), p=p)]
        mine = src.urls[lane::lanes]
        while True:
            for i in rng.permutation(len(mine)):
                yield mine[i]

    def _samples(self, src: _ResolvedSource, rng: np.random.Generator, lane: int, lanes: int,
                 skips: _SkipCounter) -> Iterator[dict]:
        """Endless crops from one source; fails clearly if the source has nothing usable."""
        barren = 0
        for url in self._shard_sequence(src, rng, lane, lanes):
            produced = 0
            try:
                stream = open_url(url, "rb", self.cfg.storage_options)
            except StorageError as err:
                skips(err)
                stream = None
            if stream is not None:
                with stream:
                    files = tar_file_expander([{"url": url, "stream": stream}], handler=skips)
                    for sample in group_by_keys(files, handler=skips):
                        crop = self._crop(sample, rng, skips)
                        if crop is not None:
                            produced += 1
                            yield crop
            barren = 0 if produced else barren + 1
            if barren > 2 * len(src.urls) + 8:
                raise RuntimeError(
                    f"source '{src.name}': {barren} shards in a row gave no usable sample "
                    f"(last: {url}); are the shards empty, corrupt or smaller than the patch size?"
                )

    def _crop(self, sample: dict, rng: np.random.Generator, skips: _SkipCounter) -> Optional[dict]:
        key = sample.get("__key__", "?")
        gt_bytes, lq_bytes = _image_fields(sample)
        if gt_bytes is None:
            skips(ValueError(f"{sample.get('__url__')}: sample '{key}' has no gt image"))
            return None
        meta = json.loads(sample["json"]) if sample.get("json") else {}
        if lq_bytes is None and meta.get("type", "clean") != "clean":
            skips(ValueError(f"{sample.get('__url__')}: paired sample '{key}' lost its lq image"))
            return None
        try:
            gt = _decode(gt_bytes)
            lq = _decode(lq_bytes) if lq_bytes is not None else None
        except RuntimeError as err:
            skips(ValueError(f"{sample.get('__url__')}: sample '{key}' does not decode: {err}"))
            return None
        p = self.cfg.patch_size
        _, h, w = gt.shape
        if h < p or w < p or (lq is not None and lq.shape != gt.shape):
            skips(ValueError(f"{sample.get('__url__')}: sample '{key}' is {h}x{w}, smaller than "
                             f"the patch {p} or unlike its pair"))
            return None
        y, x = int(rng.integers(0, h - p + 1)), int(rng.integers(0, w - p + 1))
        hflip, vflip = (rng.random(2) < 0.5) if self.cfg.flips else (False, False)
        out = {}
        for role, img in (("gt", gt), ("lq", lq)):
            if img is None:
                continue
            # numpy views and one copy: tiny per-sample torch ops pay for thread hand-offs.
            view = img.numpy()[:, y : y + p, x : x + p]
            if hflip:
                view = view[:, :, ::-1]
            if vflip:
                view = view[:, ::-1, :]
            out[role] = np.ascontiguousarray(view)
        out["meta"] = meta
        out["key"] = key
        out["clean_id"] = clean_identity(meta, key)
        return out

    def _lane(self, slot: int, lane: int, skips: _SkipCounter) -> Iterator[list[dict]]:
        """The micro-batches of slot ``slot`` at the steps ``s`` with ``s % lanes_per_slot == lane``."""
        rng = np.random.default_rng([self.cfg.seed, self.epoch, slot, lane])
        lane_id, lanes = slot * self.lanes_per_slot + lane, self.plan.slots * self.lanes_per_slot
        streams = [self._samples(s, rng, lane_id, lanes, skips) for s in self.sources]
        buffer: list[dict] = []
        while True:
            batch = []
            while len(batch) < self.cfg.batch_size:
                while len(buffer) < self.cfg.shuffle_buffer:
                    buffer.append(next(streams[rng.choice(len(streams), p=self.probs)]))
                i = int(rng.integers(len(buffer)))
                buffer[i], buffer[-1] = buffer[-1], buffer[i]
                batch.append(buffer.pop())
            yield batch

    def __iter__(self) -> Iterator[dict]:
        # The DataLoader takes batch i of this launch from worker i % workers; all the batches of
        # one lane then fall to one worker, which replays the lane up to the resume point.
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        if info is not None:
            torch.set_num_threads(1)  # loader workers share the host's cores with the trainer
        skips = _SkipCounter()
        lanes: dict[tuple[int, int], Iterator[list[dict]]] = {}
        reported = 0
        i = -1
        for step in range(self.start_step, self.steps_per_epoch):
            for k in range(self.plan.per_rank):
                i += 1
                if i % workers != worker:
                    continue
                key = (self.plan.first_slot + k, step % self.lanes_per_slot)
                if key not in lanes:
                    lanes[key] = self._lane(*key, skips)
                    for _ in range(step // self.lanes_per_slot):
                        next(lanes[key])  # trained on before the resume point: replayed, not yielded
                    reported = skips.count  # and their bad samples were counted then
                yield _collate(next(lanes[key]), skips.count - reported)
                reported = skips.count


def _collate(samples: list[dict], skipped: int) -> dict:
    """Stack a batch as uint8 (a quarter of float32's bytes between processes); the
    degraded side is sent only when some sample of the batch has one."""
    gt = torch.from_numpy(np.stack([s["gt"] for s in samples]))
    paired = torch.tensor([s.get("lq") is not None for s in samples])
    lq = None
    if paired.any():
        lq = torch.from_numpy(np.stack([s["lq"] if s.get("lq") is not None else s["gt"] for s in samples]))
    metas = [s["meta"] for s in samples]
    return {
        "gt": gt,
        "lq": lq,
        "paired": paired,
        "type": [m.get("type", "clean") for m in metas],
        "dataset": [m.get("dataset", "") for m in metas],
        "key": [s["key"] for s in samples],
        "clean_id": [s["clean_id"] for s in samples],
        "skipped": skipped,
    }


def _to_float(batch: dict) -> dict:
    # True division of uint8 by a float makes the float32 tensor in one pass.
    batch["gt"] = batch["gt"] / 255.0
    # Clean-only samples carry lq == gt: the training step synthesises their degradation.
    batch["lq"] = batch["gt"] if batch["lq"] is None else batch["lq"] / 255.0
    return batch


def _dist_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class EpochLoader:
    """One epoch of ready batches from a :class:`ShardStream`, optionally resumed mid-epoch."""

    def __init__(self, stream: ShardStream, num_workers: int) -> None:
        self.stream = stream
        self.loader = DataLoader(
            stream,
            batch_size=None,  # workers batch themselves
            num_workers=num_workers,
            prefetch_factor=4 if num_workers else None,
            persistent_workers=False,
        )

    def __len__(self) -> int:
        return len(self.stream)

    def __iter__(self) -> Iterator[dict]:
        for batch in self.loader:
            yield _to_float(batch)


def build_loader(cfg: LoaderConfig, rank: Optional[int] = None, world_size: Optional[int] = None,
                 epoch: int = 0, start_step: int = 0, plan: Optional[BatchPlan] = None) -> EpochLoader:
    """This rank's batches of one epoch: ``plan.per_rank`` micro-batches per step (one per rank
    without a plan).

    ``start_step`` resumes inside an epoch: the batches before it are regenerated and dropped, so
    the rest of the epoch is exactly what an uninterrupted run would see, at any number of ranks."""
    stream = ShardStream(cfg, rank, world_size, plan)
    stream.set_epoch(epoch, start_step)
    return EpochLoader(stream, cfg.num_workers)
