"""Data-path figures, each next to its baseline in the same run (prints; asserts nothing).

    python benchmarks/bench_data.py [--images ../shared/datasets/Urban100_50] [--samples 640]

1. Shard builder images/s with 1 and 2 worker processes, against a plain single-process
   loop over ``webdataset.ShardWriter`` doing the same work (decode, tile, encode PNG).
2. Training data path samples/s (batches of random 256x256 crops with flips) with 0 and 2
   loader workers, against a PromptIR-style map-style dataset that opens each image file
   with PIL and crops it, on the same images with the same DataLoader settings.
"""

from __future__ import annotations

import argparse
import io
import os
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "platform"), str(REPO)]

import numpy as np  # noqa: E402
import torch  # noqa: E402
import webdataset as wds  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from dataset_tools.build import BuildConfig, build_shards  # noqa: E402
from dataset_tools.sources import SourceSpec  # noqa: E402
from perceive_ir.data.pipeline import LoaderConfig, ShardSourceConfig, build_loader  # noqa: E402

# Sub-images of 1.5x the training patch, as sub-image extraction does for 256-pixel crops.
TILE, STRIDE, PATCH, BATCH = 384, 256, 256, 8


def plain_shardwriter_loop(images: list[Path], out: Path) -> int:
    """The obvious way: one process, PIL, tile, PNG, ShardWriter."""
    out.mkdir(parents=True)
    count = 0
    with wds.ShardWriter(str(out / "plain-%06d.tar"), maxcount=1000, verbose=0) as sink:
        for path in images:
            arr = np.asarray(Image.open(path).convert("RGB"))
            h, w = arr.shape[:2]
            ys = sorted(set(list(range(0, max(1, h - TILE + 1), STRIDE)) + [max(0, h - TILE)]))
            xs = sorted(set(list(range(0, max(1, w - TILE + 1), STRIDE)) + [max(0, w - TILE)]))
            for y in ys:
                for x in xs:
                    buf = io.BytesIO()
                    Image.fromarray(arr[y : y + TILE, x : x + TILE]).save(buf, format="PNG", compress_level=1)
                    sink.write({"__key__": f"{path.stem}_y{y}_x{x}", "gt.png": buf.getvalue()})
                    count += 1
    return count


def bench_builder(images_dir: Path, work: Path) -> Path:
    images = sorted(p for p in images_dir.iterdir() if p.suffix.lower() == ".png")
    print(f"\n1. Shard builder on {len(images)} images of {images_dir.name} (tiles {TILE}/{STRIDE}, PNG)")
    rows = []
    start = time.perf_counter()
    n = plain_shardwriter_loop(images, work / "plain")
    base = len(images) / (time.perf_counter() - start)
    rows.append(("plain ShardWriter loop", base, n))
    built = None
    for workers in (1, 2):
        out = work / f"built{workers}"
        start = time.perf_counter()
        manifest = build_shards(BuildConfig(
            output=str(out), sources=[SourceSpec("urban100", str(images_dir))], tile_size=TILE,
            tile_stride=STRIDE, encode="png", workers=workers, progress=False, max_samples_per_shard=100))
        rows.append((f"perceive-shards, {workers} worker{'s' if workers > 1 else ''}",
                     len(images) / (time.perf_counter() - start), manifest.total_samples))
        built = out
    print(f"   {'builder':<30} {'images/s':>9} {'samples':>8} {'vs plain':>9}")
    for name, rate, samples in rows:
        print(f"   {name:<30} {rate:>9.1f} {samples:>8} {rate / base:>8.2f}x")
    return built


class PromptIRStyleDataset(Dataset):
    """What the peers' training code does: open the file with PIL each time, crop, flip."""

    def __init__(self, files: list[Path], length: int) -> None:
        self.files, self.length = files, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> torch.Tensor:
        arr = np.asarray(Image.open(self.files[i % len(self.files)]).convert("RGB"))
        h, w = arr.shape[:2]
        y, x = random.randint(0, h - PATCH), random.randint(0, w - PATCH)
        crop = arr[y : y + PATCH, x : x + PATCH]
        if random.random() < 0.5:
            crop = crop[:, ::-1]
        if random.random() < 0.5:
            crop = crop[::-1]
        return torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1).float().div_(255.0)


WARMUP_BATCHES = 8  # excluded: worker start-up and the first fill of the shuffle buffer


def _rate(loader) -> float:
    """Steady-state samples/s."""
    it = iter(loader)
    for _ in range(WARMUP_BATCHES):
        next(it)
    seen, start = 0, time.perf_counter()
    for batch in it:
        seen += (batch["gt"] if isinstance(batch, dict) else batch).shape[0]
    return seen / (time.perf_counter() - start)


def bench_loader(images_dir: Path, shards: Path, samples: int) -> None:
    files = sorted(p for p in images_dir.iterdir() if p.suffix.lower() == ".png")
    print(f"\n2. Training data path: batches of {BATCH} random {PATCH}x{PATCH} crops with flips, "
          f"{samples} samples per row after {WARMUP_BATCHES} warm-up batches")
    print(f"   {'loader workers':<15} {'PromptIR-style/s':>17} {'shards/s':>9} {'ratio':>7}")
    for workers in (0, 2):
        total = samples + WARMUP_BATCHES * BATCH
        peer = DataLoader(PromptIRStyleDataset(files, total), batch_size=BATCH, shuffle=True, num_workers=workers)
        peer_rate = _rate(peer)
        ours = build_loader(LoaderConfig(sources=[ShardSourceConfig(str(shards))], patch_size=PATCH,
                                         batch_size=BATCH, samples_per_epoch=total, num_workers=workers,
                                         shuffle_buffer=32))
        our_rate = _rate(ours)
        print(f"   {workers:<15} {peer_rate:>17.1f} {our_rate:>9.1f} {our_rate / peer_rate:>6.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", default=str(REPO.parent / "shared" / "datasets" / "Urban100_50"))
    parser.add_argument("--samples", type=int, default=640)
    args = parser.parse_args()
    images = Path(args.images)
    if not images.is_dir():
        sys.exit(f"benchmark images not found: {images}")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        shards = bench_builder(images, Path(tmp))
        bench_loader(images, shards, args.samples)


if __name__ == "__main__":
    main()
