"""Images/s per degradation type: the batched engine next to a per-image numpy/PIL/SciPy path.

    python benchmarks/bench_degrade.py                 # CPU, batch 16 x 3 x 256 x 256
    python benchmarks/bench_degrade.py --device cuda   # the engine on the GPU (reference stays on the CPU)

Both paths run in the same process on the same real photos (scikit-image samples cut
into 256 px crops) with the same parameters (those the engine reports in its labels);
one warm-up call is excluded and the median of --repeats timed calls is reported. The
per-image path is what a data-loader worker would do for one image: NumPy noise from a
per-image generator, SciPy FFT convolution (the same algorithm the engine batches) on a
mirror-padded image, PIL for resizing and JPEG. It prints figures and asserts nothing.
"""

from __future__ import annotations

import argparse
import io
import math
import statistics
import sys
import time

import numpy as np
import torch
from PIL import Image
from scipy.signal import fftconvolve

from perceive_ir.degrade import Degrader, DegradationConfig, Spec, names
from perceive_ir.degrade.haze import DEPTH_FAR, DEPTH_NEAR, FIELD_CELLS, GRADIENT_WEIGHT
from perceive_ir.degrade.rain import CANVAS_MARGIN, MAX_DENSITY

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")


def real_batch(batch: int, size: int) -> torch.Tensor:
    """``batch`` distinct crops of package photos, each resized so 2 x 2 crops fit."""
    import skimage.data

    crops = []
    while len(crops) < batch:
        for name in PHOTOS:
            photo = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
            photo = photo.resize((2 * size, 2 * size), Image.BICUBIC)
            array = np.asarray(photo)
            for top in (0, size):
                for left in (0, size):
                    crops.append(array[top : top + size, left : left + size])
    stacked = np.stack(crops[:batch]).astype(np.float32) / 255.0
    return torch.from_numpy(stacked).permute(0, 3, 1, 2).contiguous()


# ----- per-image reference implementations (H x W x 3 float32 in [0, 1]) -----


def _grid(radius: int) -> tuple[np.ndarray, np.ndarray]:
    r = np.arange(-radius, radius + 1, dtype=np.float32)
    return r[:, None], r[None, :]


def _filter(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    radius = kernel.shape[0] // 2
    padded = np.pad(image, ((radius, radius), (radius, radius), (0, 0)), mode="reflect")
    return fftconvolve(padded, kernel[:, :, None], mode="valid", axes=(0, 1))


def _line(length, angle, width, dy, dx) -> np.ndarray:
    along = dx * math.cos(angle) + dy * math.sin(angle)
    across = -dx * math.sin(angle) + dy * math.cos(angle)
    return np.clip(length / 2 + 0.5 - np.abs(along), 0, 1) * np.clip(width / 2 + 0.5 - np.abs(across), 0, 1)


def ref_gaussian_noise(x, p, rng):
    return np.clip(x + rng.standard_normal(x.shape, dtype=np.float32) * (p["sigma"] / 255), 0, 1)


def _signal_noise(x, peak, read, rng):
    std = np.sqrt(np.clip(x, 0, None) / peak + (read / 255) ** 2)
    return x + std * rng.standard_normal(x.shape, dtype=np.float32)


def ref_poisson_gaussian_noise(x, p, rng):
    return np.clip(_signal_noise(x, p["peak"], p["read_sigma"], rng), 0, 1)


def ref_gaussian_blur(x, p, rng):
    dy, dx = _grid(int(p["size"]) // 2)
    c, s = math.cos(p["theta"]), math.sin(p["theta"])
    along, across = dx * c + dy * s, -dx * s + dy * c
    k = np.exp(-0.5 * ((along / p["sigma_major"]) ** 2 + (across / p["sigma_minor"]) ** 2))
    return np.clip(_filter(x, k / k.sum()), 0, 1)


def ref_motion_blur(x, p, rng):
    dy, dx = _grid(12)
    k = _line(p["length"], p["angle"], 1.0, dy, dx)
    return np.clip(_filter(x, k / k.sum()), 0, 1)


def ref_rain(x, p, rng):
    h, w = x.shape[:2]
    canvas_h, canvas_w = h + CANVAS_MARGIN, w + CANVAS_MARGIN
    count = math.ceil(MAX_DENSITY * canvas_h * canvas_w)
    position = rng.integers(0, canvas_h * canvas_w, count)
    u = rng.random(count, dtype=np.float32) * MAX_DENSITY
    keep = u < p["density"]
    drops = np.zeros(canvas_h * canvas_w, np.float32)
    np.maximum.at(drops, position[keep], 1 - 0.5 * u[keep] / p["density"])
    dy, dx = _grid(30)
    k = _line(p["length"], math.pi / 2 - math.radians(p["angle"]), p["width"], dy, dx)
    streaks = np.clip(fftconvolve(drops.reshape(canvas_h, canvas_w), k, mode="same"), 0, 1)
    m = CANVAS_MARGIN // 2
    rain = (streaks[m : m + h, m : m + w] * p["brightness"])[:, :, None]
    return np.clip(x + rain * (1 - x), 0, 1)


def ref_haze(x, p, rng):
    h, w = x.shape[:2]
    field = Image.fromarray(rng.random((FIELD_CELLS, FIELD_CELLS), dtype=np.float32), mode="F")
    field = np.clip(np.asarray(field.resize((w, h), Image.BICUBIC)), 0, 1)
    rows = np.linspace(1, 0, h, dtype=np.float32)[:, None]
    depth = DEPTH_NEAR + (DEPTH_FAR - DEPTH_NEAR) * (GRADIENT_WEIGHT * rows + (1 - GRADIENT_WEIGHT) * field)
    t = np.exp(-p["beta"] * depth)[:, :, None]
    return np.clip(x * t + p["airlight"] * (1 - t), 0, 1)


def ref_low_light(x, p, rng):
    dark = (x * p["gain"]) ** p["gamma"]
    return np.clip(_signal_noise(dark, p["peak"], p["read_sigma"], rng), 0, 1)


def ref_jpeg(x, p, rng):
    buffer = io.BytesIO()
    Image.fromarray((x * 255).round().astype(np.uint8)).save(buffer, format="JPEG", quality=int(p["quality"]))
    return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"), dtype=np.float32) / 255


def ref_mixed(x, p, rng):
    for step in p["steps"]:
        x = REFERENCES[step["type"]](x, step["params"], rng)
    return x


REFERENCES = {name[4:]: fn for name, fn in dict(globals()).items() if name.startswith("ref_")}


def per_image(images: np.ndarray, params: list[dict], seeds: list[int], name: str) -> list[np.ndarray]:
    fn = REFERENCES[name]
    return [fn(img, p, np.random.default_rng(seed)) for img, p, seed in zip(images, params, seeds)]


def timed(fn, repeats: int, sync=lambda: None) -> float:
    fn()  # warm-up
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Degradation throughput: batched engine vs per-image reference")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] for the batched engine")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--severity", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--types", nargs="*", default=None, help="default: every registered type")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads for the engine (default 1: the per-image path runs on one core too; 0: torch's choice)",
    )
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"no GPU found: torch {torch.__version__} reports torch.cuda.is_available() == False; nothing to run on {args.device}")
        return 0
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} torch threads"

    clean = real_batch(args.batch, args.size)
    as_numpy = clean.permute(0, 2, 3, 1).numpy().copy()
    clean = clean.to(device)
    degrader = Degrader(DegradationConfig(seed=0))
    keys = [f"bench-{i}" for i in range(args.batch)]
    print(f"batch {args.batch} x 3 x {args.size} x {args.size}, severity {args.severity}, engine on {device} ({where}), "
          f"per-image reference on the CPU (numpy/PIL/SciPy), median of {args.repeats} after 1 warm-up; torch {torch.__version__}")
    header = f"{'type':<24}| {'batched images/s':>17} | {'per-image images/s':>18} | {'ratio':>6}"
    print(header)
    print("-" * len(header))
    for name in args.types or names():
        specs = [Spec(name, severity=args.severity)] * args.batch
        _, labels = degrader(clean, keys, specs=specs)
        batched = timed(lambda: degrader(clean, keys, specs=specs), args.repeats, sync)
        reference = timed(lambda: per_image(as_numpy, labels.params, labels.seeds, name), args.repeats)
        fast, slow = args.batch / batched, args.batch / reference
        print(f"{name:<24}| {fast:>17.1f} | {slow:>18.1f} | {fast / slow:>5.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
