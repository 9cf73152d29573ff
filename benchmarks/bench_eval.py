"""Full-image evaluation throughput on CBSD68 at sigma 25 (figures only, no assertions).

    python benchmarks/bench_eval.py [--images 68] [--model quickstart|restormer_tiny] [--rounds 2]

Compares, on the same restorer in the same process:

- peers' loop: one image at a time, as the all-in-one papers' test scripts do it: read the PNG,
  add numpy Gaussian noise on the 0-255 scale, 8-bit round, restore a 1-image batch, then
  scikit-image's PSNR and SSIM on the CPU;
- scorer: this platform's worker path (:class:`perceive_ir.eval.scoring.Scorer`): images of one size
  batched as the device prefers (one at a time on a CPU), seeded degradation on the device, reflect
  padding to the multiple, PSNR and SSIM in torch, for the input as well as the output;
- protocol: the same through Ray (``ray.num_workers`` actors, chunks, progress), actor start-up
  included, Ray start-up not.

Turns alternate (peers, scorer, protocol, peers, ...) so that a busy machine slows all of them
alike; each figure is the best round. Needs ../shared/datasets/CBSD68.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for entry in (REPO / "platform", REPO):
    if str(entry) not in sys.path:
        sys.path.insert(0, str(entry))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from perceive_ir.config import from_dict, load_config  # noqa: E402
from perceive_ir.eval.inference import InferenceConfig  # noqa: E402
from perceive_ir.workflows.evaluation import EvalConfig, chunk_items, chunk_size, score_chunks, start_workers  # noqa: E402
from perceive_ir.eval.scoring import Scorer  # noqa: E402
from perceive_ir.eval.suite import SuiteConfig, resolve_suite  # noqa: E402
from perceive_ir.models import RestorerConfig  # noqa: E402

MODELS = {"quickstart": REPO / "configs/stage2_tiny.yaml", "restormer_tiny": REPO / "configs/models/restormer_tiny.yaml"}


def restorer_config(name: str) -> RestorerConfig:
    import yaml

    raw = yaml.safe_load(MODELS[name].read_text())
    return from_dict(RestorerConfig, raw.get("restorer", raw), str(MODELS[name]))


def peers_loop(model: torch.nn.Module, files: list[Path], seed: int = 0) -> tuple[float, float]:
    """Seconds for the whole loop, and of them in the model's forward."""
    from PIL import Image
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    rng = np.random.RandomState(seed)
    start, forward = time.perf_counter(), 0.0
    for path in files:
        clean = np.asarray(Image.open(path).convert("RGB"))
        noisy = np.clip(clean + rng.randn(*clean.shape) * 25, 0, 255).astype(np.uint8)
        x = torch.from_numpy(noisy).permute(2, 0, 1)[None].float() / 255
        with torch.no_grad():
            begin = time.perf_counter()
            out = model(x)
            forward += time.perf_counter() - begin
            out = out.clamp(0, 1)[0].permute(1, 2, 0).numpy().astype(np.float64)
        reference = clean.astype(np.float64) / 255
        peak_signal_noise_ratio(reference, out, data_range=1)
        structural_similarity(reference, out, data_range=1, channel_axis=2)
    return time.perf_counter() - start, forward


def ssim_costs(files: list[Path], seed: int = 0) -> tuple[float, float, float]:
    """Milliseconds per image of this platform's SSIM and scikit-image's on the noisy images, and their
    largest difference."""
    from PIL import Image
    from skimage.metrics import structural_similarity

    from perceive_ir.eval.metrics import ssim

    rng = np.random.RandomState(seed)
    spent = {"torch": 0.0, "skimage": 0.0}
    largest = 0.0
    for path in files:
        clean = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64) / 255
        noisy = np.round(np.clip(clean + rng.randn(*clean.shape) * 25 / 255, 0, 1) * 255) / 255
        x, y = (torch.from_numpy(a).permute(2, 0, 1)[None].float() for a in (noisy, clean))
        begin = time.perf_counter()
        ours = ssim(x, y).item()
        spent["torch"] += time.perf_counter() - begin
        begin = time.perf_counter()
        reference = structural_similarity(clean, noisy, data_range=1, channel_axis=2)
        spent["skimage"] += time.perf_counter() - begin
        largest = max(largest, abs(ours - reference))
    return spent["torch"] * 1000 / len(files), spent["skimage"] * 1000 / len(files), largest


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=68)
    parser.add_argument("--model", choices=sorted(MODELS), default="quickstart")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=None, help="default: the device's (1 on a CPU)")
    args = parser.parse_args()

    import ray

    from perceive_ir.products import save_restorer

    root = REPO.parent / "shared" / "datasets"
    suite = from_dict(SuiteConfig, {"name": "bench", "data_root": str(root), "sets": [
        {"name": "CBSD68", "clean": "CBSD68", "limit": args.images, "degradations": {"gaussian_noise": ["sigma25"]}}]})
    _, items, _ = resolve_suite(suite)
    files = [Path(i.clean) for i in items]
    cfg = restorer_config(args.model)
    torch.manual_seed(0)
    model = cfg.build().eval()
    threads = torch.get_num_threads()
    scorer = Scorer(model, InferenceConfig(batch_size=args.batch_size), seed=0)

    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="bench-eval-"))
    save_restorer(model, cfg, folder / "restorer")
    overrides = [f"model={folder / 'restorer'}", "progress=false", f"ray.resources_per_worker={{CPU: {threads}}}"]
    if args.batch_size:
        overrides.append(f"inference.batch_size={args.batch_size}")
    eval_cfg = load_config(EvalConfig, REPO / "configs/eval/quickstart.yaml", overrides)
    product = {n: (folder / "restorer" / n).read_bytes() for n in ("restorer.json", "model.safetensors")}
    ray.init(address="local", num_cpus=threads, runtime_env={"env_vars": {"PYTHONPATH": str(REPO / "platform")}})

    start_up: list[float] = []

    def protocol() -> float:
        start = time.perf_counter()
        workers = start_workers(eval_cfg, product)
        ray.get([w.__ray_ready__.remote() for w in workers])
        start_up.append(time.perf_counter() - start)
        score_chunks(workers, chunk_items(items, chunk_size(eval_cfg.inference)), progress=False)
        elapsed = time.perf_counter() - start
        for w in workers:
            ray.kill(w)
        return elapsed

    def scorer_turn() -> float:
        start = time.perf_counter()
        scorer.score(items)
        return time.perf_counter() - start

    peers_loop(model, files[:2])  # warm-up
    scorer.score(items[:2])
    best = {"peers": float("inf"), "scorer": float("inf"), "protocol": float("inf")}
    forward_share = 0.0  # of the fastest peers' round
    for _ in range(args.rounds):
        peers_s, forward_s = peers_loop(model, files)
        if peers_s < best["peers"]:
            best["peers"], forward_share = peers_s, forward_s / peers_s
        for name, turn in (("scorer", scorer_turn), ("protocol", protocol)):
            best[name] = min(best[name], turn())
    ray.shutdown()
    shutil.rmtree(folder, ignore_errors=True)
    n = len(items)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"CBSD68 sigma 25, {n} full images (481x321), model '{args.model}' ({params:.2f} M parameters), "
          f"{threads} torch threads, batch {args.batch_size or 'of the device (1)'}, best of {args.rounds} alternating rounds")
    print(f"{'path':<44} {'images/s':>9} {'speed-up':>9}")
    base = n / best["peers"]
    for name, label in (("peers", "peers' loop (one image, skimage metrics)"),
                        ("scorer", "scorer (input + output metrics)"),
                        ("protocol", "protocol on Ray (1 actor, start-up incl.)")):
        rate = n / best[name]
        print(f"{label:<44} {rate:>9.2f} {rate / base:>8.2f}x")
    print(f"actor start-up (process, imports, model) {min(start_up):.1f} s of the protocol's best round")
    ssim_torch, ssim_skimage, largest = ssim_costs(files)
    print(f"SSIM of one image: torch {ssim_torch:.0f} ms, scikit-image {ssim_skimage:.0f} ms "
          f"({ssim_skimage / ssim_torch:.1f}x); largest difference over the {n} images {largest:.1e}")
    print(f"the model's forward is {forward_share:.0%} of the peers' loop: the most a loop around the same "
          f"forward can gain on this device is {1 / forward_share:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
