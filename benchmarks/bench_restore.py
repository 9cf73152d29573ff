"""Batch restoration throughput: the Ray Data job against a one-image-at-a-time loop over the pyfunc
model, on the same images in the same run, with 1 and 2 actors; then the job's memory bound.

    python benchmarks/bench_restore.py [--model models:/quickstart-restorer@champion] [--images 24]
        [--size 256] [--actors 1 2] [--gpu] [--memory-images N [N ...]] [--memory-only]

The images are crops of real photos (scikit-image), written as PNG into a temporary folder. The
baseline loads the registered model with ``mlflow.pyfunc.load_model`` and calls ``predict`` on one
decoded image at a time (decode, predict, encode, write, in one process). Each job run restores
into a fresh output folder and scores with the pair's perceiver as the job does by default. Figures
include Ray Data's start and each actor's model load.

``--memory-images N [N ...]`` then restores collections of N larger images (--memory-size) with
``ray.in_flight_mb`` set to 32 on a local Ray whose object store is 128 MiB: for each, it prints the
collection's decoded size, the peak memory (RSS) of the job's Ray worker processes sampled every
50 ms, and what Ray spilled to disk; two sizes side by side show that the peak does not follow the
collection. ``--memory-only`` skips the throughput part.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for entry in (REPO / "platform", REPO):
    if str(entry) not in sys.path:
        sys.path.insert(0, str(entry))

import numpy as np  # noqa: E402


def photo_crops(count: int, size: int) -> list[np.ndarray]:
    from skimage import data

    photos = [np.asarray(getattr(data, n)())[..., :3] for n in ("astronaut", "coffee", "chelsea", "rocket")]
    rng = np.random.default_rng(0)
    crops = []
    for k in range(count):
        photo = photos[k % len(photos)]
        h, w = min(size, photo.shape[0]), min(size, photo.shape[1])
        top, left = rng.integers(0, photo.shape[0] - h + 1), rng.integers(0, photo.shape[1] - w + 1)
        crop = photo[top:top + h, left:left + w]
        if crop.shape[:2] != (size, size):  # larger than the photo: tile it
            crop = np.tile(crop, (size // h + 1, size // w + 1, 1))[:size, :size]
        crops.append(np.ascontiguousarray(crop))
    return crops


def write_pngs(folder: Path, images: list[np.ndarray]) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for k, image in enumerate(images):
        Image.fromarray(image).save(folder / f"img{k:04d}.png")
    return folder


def baseline(model_uri: str, tracking_uri: str, inputs: Path, output: Path) -> float:
    """images/s of decode -> predict -> encode -> write, one image at a time, model load excluded."""
    import mlflow
    from PIL import Image

    mlflow.set_tracking_uri(tracking_uri)
    model = mlflow.pyfunc.load_model(model_uri)
    files = sorted(inputs.glob("*.png"))
    output.mkdir(parents=True, exist_ok=True)
    model.predict(np.asarray(Image.open(files[0]))[None])  # warm-up
    start = time.perf_counter()
    for path in files:
        restored = model.predict(np.asarray(Image.open(path).convert("RGB"))[None])[0]
        buffer = io.BytesIO()
        Image.fromarray(np.rint(restored * 255).astype(np.uint8)).save(buffer, format="PNG")
        (output / path.name).write_bytes(buffer.getvalue())
    return len(files) / (time.perf_counter() - start)


def job(model_uri: str, tracking_uri: str, inputs: Path, output: Path, actors: int, gpu: bool,
        extra: list[str] = ()) -> dict:
    from perceive_ir.config import load_config
    from perceive_ir.workflows.restoration import RestoreConfig, run_restoration

    overrides = [f"model={model_uri}", f"input={inputs}", f"output={output}", f"tracking.uri={tracking_uri}",
                 f"ray.actors={actors}", f"ray.use_gpu={str(gpu).lower()}", "progress=false",
                 f"run_name=bench-{output.name}", *extra]
    cfg = load_config(RestoreConfig, REPO / "configs" / "restore.yaml", overrides)
    start = time.perf_counter()
    result = run_restoration(cfg)
    return result.summary | {"wall_s": time.perf_counter() - start}


class PeakMemory:
    """The peak summed RSS of the worker processes of this benchmark's local Ray, sampled in a thread."""

    def __init__(self) -> None:
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        # the worker processes of this run's own local Ray: below its raylet (not another Ray on the machine)
        raylet = next(p for p in psutil.Process().children(recursive=True) if "raylet" in p.name())
        while not self._stop.is_set():
            total = 0
            for proc in raylet.children(recursive=True):
                try:
                    total += proc.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            self._stop.wait(0.05)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def untrained_model(root: Path) -> tuple[str, str]:
    """A freshly initialised restorer of the tiny profile (configs/stage2_tiny.yaml), registered with no
    perceiver in a SQLite store under ``root``: timing figures where no trained model is at hand."""
    import yaml
    from mlflow.tracking import MlflowClient

    from perceive_ir import products
    from perceive_ir.config import from_dict
    from perceive_ir.models import RestorerConfig
    from perceive_ir.registry.registration import register_product

    cfg = from_dict(RestorerConfig, yaml.safe_load((REPO / "configs" / "stage2_tiny.yaml").read_text())["restorer"])
    folder = products.save_restorer(cfg.build().eval(), cfg, root / "restorer")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    run = client.create_run(client.create_experiment("bench", artifact_location=str(root / "artifacts"))).info.run_id
    return register_product(uri, run, folder, "bench-restorer", {"lineage.product": "restorer"}), uri


def throughput(args, root: Path) -> None:
    print(f"throughput: {args.images} PNG crops of {args.size} x {args.size}")
    inputs = write_pngs(root / "in", photo_crops(args.images, args.size))
    rate = baseline(args.model, args.tracking_uri, inputs, root / "loop")
    print(f"{'one-at-a-time pyfunc loop':<34} {rate:8.2f} images/s")
    for actors in args.actors:
        summary = job(args.model, args.tracking_uri, inputs, root / f"job{actors}", actors, args.gpu)
        print(f"{f'job, {actors} actor(s)':<34} {summary['images_per_s']:8.2f} images/s "
              f"({summary['launch_restored']} images in {summary['launch_seconds']:.1f} s, start-up included; "
              f"{summary['restore_seconds_per_image'] * 1000:.0f} ms of network per image)")


def memory_bound(args, root: Path, count: int) -> None:
    from ray._private.internal_api import memory_summary

    big = write_pngs(root / "in", photo_crops(count, args.memory_size))
    decoded = count * args.memory_size ** 2 * 3
    with PeakMemory() as peak:
        summary = job(args.model, args.tracking_uri, big, root / "out", 1, args.gpu,
                      ["ray.in_flight_mb=32", "batch_images=1", "decode_batch=1"])
    spilled = [line.strip() for line in memory_summary(stats_only=True).splitlines() if "Spilled" in line]
    print(f"memory: {count} images of {args.memory_size}^2, {decoded / 2**20:.0f} MiB decoded "
          f"(uint8; {decoded * 4 / 2**20:.0f} MiB as float32); object store 128 MiB, in_flight_mb 32; "
          f"peak RSS of the Ray workers {peak.peak / 2**20:.0f} MiB; {summary['restored']} restored; "
          f"{spilled[0] if spilled else 'nothing spilled'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models:/quickstart-restorer@champion",
                        help="a registered restorer; 'untrained': a new tiny-profile one (timing only)")
    parser.add_argument("--tracking-uri", default=f"sqlite:///{Path('runs/mlflow.db').resolve()}")
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--gpu", action="store_true", help="one GPU per actor; the baseline on the GPU too")
    parser.add_argument("--memory-images", type=int, nargs="*", default=[])
    parser.add_argument("--memory-size", type=int, default=1024)
    parser.add_argument("--memory-only", action="store_true", help="skip the throughput comparison")
    args = parser.parse_args(argv)

    import ray

    ray.init(address="local", include_dashboard=False, log_to_driver=False,
             object_store_memory=128 * 2**20 if args.memory_images else None)
    with tempfile.TemporaryDirectory(prefix="bench-restore-") as folder:
        root = Path(folder)
        if args.model == "untrained":
            args.model, args.tracking_uri = untrained_model(root)
        print(f"ray: {ray.cluster_resources().get('CPU', 0):.0f} CPUs, {ray.cluster_resources().get('GPU', 0):.0f} "
              f"GPUs; model {args.model}")
        if not args.memory_only:
            throughput(args, root)
        for count in args.memory_images:
            memory_bound(args, root / f"memory{count}", count)
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
