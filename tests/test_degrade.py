"""Degradation engine on real photos: statistics, monotone severity, determinism, codecs."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from perceive_ir.config import ConfigError, from_dict
from perceive_ir.degrade import DegradationConfig, Degrader, SampleRNG, Spec, names
from perceive_ir.degrade import haze as haze_module
from perceive_ir.degrade import sheet

DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
CROP = 96


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """These tensors are small: one thread avoids waiting on a second, busy core."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _crops(arrays: list[np.ndarray], size: int = CROP) -> torch.Tensor:
    """Centre crops of HxWx3 uint8 photos as a B x 3 x size x size float batch."""
    out = []
    for a in arrays:
        h, w = a.shape[:2]
        top, left = (h - size) // 2, (w - size) // 2
        out.append(torch.from_numpy(a[top : top + size, left : left + size].copy()).permute(2, 0, 1))
    return torch.stack(out).float().div(255.0)


def package_photos(size: int = CROP) -> torch.Tensor:
    import skimage.data

    return _crops([skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee(), skimage.data.rocket()], size)


def cbsd68(count: int = 8, size: int = CROP) -> torch.Tensor:
    folder = DATASETS / "CBSD68"
    if not folder.is_dir():
        pytest.skip(f"benchmark images not found at {folder} (../shared/datasets/CBSD68 next to the repository)")
    files = sorted(folder.glob("*.png"))[:count]
    return _crops([np.asarray(Image.open(f).convert("RGB")) for f in files], size)


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    mse = (a - b).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse)


def keys_for(n: int, prefix: str = "img") -> list[str]:
    return [f"{prefix}-{i}" for i in range(n)]


# --- Gaussian noise hits sigma -------------------------------------------------------------


def clipped_noise_power(levels: torch.Tensor, counts: torch.Tensor, sigma: float) -> float:
    """Mean of E[(clip(c + n, 0, 1) - c)^2], n ~ N(0, sigma^2), over pixels whose clean
    values c take ``levels`` with ``counts``: a censored normal per pixel."""
    c = levels
    a, b = -c / sigma, (1 - c) / sigma  # standardised clipping points
    cdf, pdf = torch.special.ndtr, lambda x: torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
    inside = (cdf(b) - cdf(a)) - (b * pdf(b) - a * pdf(a))
    power = sigma**2 * inside + c**2 * cdf(a) + (1 - c) ** 2 * (1 - cdf(b))
    return float((power * counts).sum() / counts.sum())


def estimate_sigma(clean: torch.Tensor, noisy: torch.Tensor) -> float:
    """The sigma (0-255) whose clipped noise has the measured power (bisection). Clean
    values are 8-bit levels, so the model is evaluated once per level."""
    measured = float((noisy.double() - clean.double()).pow(2).mean())
    codes = clean.mul(255).round().long().flatten()
    counts = torch.bincount(codes, minlength=256).double()
    levels = torch.arange(256, dtype=torch.float64) / 255
    low, high = 1e-4, 1.0
    for _ in range(50):
        mid = 0.5 * (low + high)
        low, high = (mid, high) if clipped_noise_power(levels, counts, mid) < measured else (low, mid)
    return 0.5 * (low + high) * 255.0


@pytest.mark.datasets
@pytest.mark.parametrize("level,sigma", [("sigma15", 15.0), ("sigma25", 25.0), ("sigma50", 50.0)])
def test_gaussian_noise_std_matches_sigma_on_cbsd68(level, sigma):
    clean = cbsd68()
    noisy, labels = Degrader()(clean, keys_for(len(clean)), specs=[Spec("gaussian_noise", level=level)] * len(clean))
    assert all(p == {"sigma": sigma} for p in labels.params)
    # The output is clamped to [0, 1], which shrinks the residual near black and white.
    # Two honest measurements over the whole batch:
    # 1) pixels at least 4 sigma from both bounds (clipping probability < 1e-4), where the
    #    residual is the raw noise: its std must match sigma (exists for sigma 15 and 25);
    margin = 4 * sigma / 255
    away = (clean > margin) & (clean < 1 - margin)
    if away.sum() > 10_000:
        std = (noisy - clean)[away].std().item() * 255
        assert abs(std / sigma - 1) < 0.02, std
    # 2) every pixel, with the clipping modelled exactly (censored normal per pixel).
    estimated = estimate_sigma(clean, noisy)
    assert abs(estimated / sigma - 1) < 0.02, estimated
    # and without that model, clipping would have been visible for sigma 50:
    if sigma == 50.0:
        assert (noisy - clean).std().item() * 255 < 0.98 * sigma


# --- Every type: range, shape, dtype, monotone severity --------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_outputs_in_range_finite_same_shape_and_dtype(dtype):
    clean = package_photos(64).to(dtype)
    degrader = Degrader(DegradationConfig(seed=3))
    for name in names():
        for severity in (0.0, 1.0):
            out, labels = degrader(clean, keys_for(len(clean)), specs=[Spec(name, severity=severity)] * len(clean))
            assert out.shape == clean.shape and out.dtype == dtype and out.device == clean.device, name
            assert torch.isfinite(out.float()).all(), name
            assert out.min() >= 0 and out.max() <= 1, name
            assert labels.types == [name] * len(clean)
            assert torch.equal(labels.severity, torch.full((len(clean),), severity, dtype=torch.float32))


def _severity_psnr(clean: torch.Tensor, name: str) -> torch.Tensor:
    """(3, B) PSNR at light, medium, heavy; the same keys, so the same nuisances."""
    degrader = Degrader(DegradationConfig(seed=11))
    rows = []
    for level in ("light", "medium", "heavy"):
        out, _ = degrader(clean, keys_for(len(clean)), specs=[Spec(name, level=level)] * len(clean))
        rows.append(psnr(out, clean))
    return torch.stack(rows)


@pytest.mark.parametrize("name", names())
def test_psnr_falls_strictly_from_light_to_heavy_on_package_photos(name):
    values = _severity_psnr(package_photos(), name)
    assert (values[0] > values[1]).all() and (values[1] > values[2]).all(), values


@pytest.mark.datasets
def test_psnr_falls_strictly_from_light_to_heavy_on_cbsd68():
    clean = cbsd68(count=3)
    for name in names():
        values = _severity_psnr(clean, name)
        assert (values[0] > values[1]).all() and (values[1] > values[2]).all(), (name, values)


# --- Determinism ------------------------------------------------------------------------------


def test_same_key_same_output_in_any_batch_position_and_size():
    photos = package_photos(80)
    degrader = Degrader(DegradationConfig(seed=5))
    for name in names():
        spec = Spec(name, severity=0.7)
        big, labels_big = degrader(photos, ["a", "b", "c", "d"], epoch=2, specs=[spec] * 4)
        # Sample "c" alone, then first in a batch of two in a different order.
        alone, labels_alone = degrader(photos[2:3], ["c"], epoch=2, specs=[spec])
        moved, _ = degrader(photos[[2, 0]], ["c", "a"], epoch=2, specs=[spec] * 2)
        # Pointwise types are bit-identical; FFT filters may differ by float rounding only.
        torch.testing.assert_close(big[2:3], alone, atol=2e-6, rtol=0, msg=name)
        torch.testing.assert_close(big[2:3], moved[0:1], atol=2e-6, rtol=0, msg=name)
        torch.testing.assert_close(big[0:1], moved[1:2], atol=2e-6, rtol=0, msg=name)
        assert labels_big.params[2] == labels_alone.params[0]
        # Different keys or another epoch: different realisations of the same image.
        other_key, _ = degrader(photos[2:3], ["z"], epoch=2, specs=[spec])
        other_epoch, _ = degrader(photos[2:3], ["c"], epoch=3, specs=[spec])
        if name in RANDOM_FIELD_TYPES:
            assert not torch.allclose(alone, other_key, atol=1e-3), name
            assert not torch.allclose(alone, other_epoch, atol=1e-3), name
        elif name == "jpeg":  # a codec at a given quality has nothing random in it
            assert torch.equal(alone, other_key)


# Types with a per-pixel random field; the blurs vary only through sampled kernel shapes.
RANDOM_FIELD_TYPES = {"gaussian_noise", "poisson_gaussian_noise", "rain", "haze", "low_light", "mixed"}


@pytest.mark.parametrize("name", ["gaussian_blur", "motion_blur"])
def test_blur_kernels_vary_with_the_key(name):
    photo = package_photos(64)[:1].expand(8, -1, -1, -1)
    out, labels = Degrader()(photo, keys_for(8), specs=[Spec(name, severity=0.8)] * 8)
    for i in range(8):
        for j in range(i):
            if labels.params[i] != labels.params[j]:
                assert not torch.allclose(out[i], out[j], atol=1e-3), (i, j)
    assert len({tuple(p.values()) for p in labels.params}) >= 3


def test_mixture_sampling_depends_on_key_not_on_batch():
    degrader = Degrader(DegradationConfig(seed=9))
    keys = keys_for(64)
    specs = degrader.sample_specs(keys, epoch=1)
    assert specs[10:20] == degrader.sample_specs(keys[10:20], epoch=1)
    assert specs != degrader.sample_specs(keys, epoch=2)
    assert len({s.type for s in specs}) >= 6  # the default mixture covers every type
    assert all(0.0 <= s.severity <= 1.0 for s in specs)
    clean = package_photos(64)[[0, 1, 2, 3] * 4]
    out, labels = degrader(clean, keys[:16], epoch=1)
    assert labels.types == [s.type for s in specs[:16]]
    assert labels.type_index.tolist() == [names().index(s.type) for s in specs[:16]]


def test_counter_rng_is_standard_normal_and_independent_between_samples():
    z = SampleRNG([1, 2, 3, 4], "cpu").normal((3, 128, 128), "noise")
    assert abs(z.mean().item()) < 0.01 and abs(z.std().item() - 1) < 0.01
    assert abs((z[0] * z[1]).mean().item()) < 0.01  # samples uncorrelated
    assert abs((z[..., 1:] * z[..., :-1]).mean().item()) < 0.01  # neighbours uncorrelated
    tail = (z.abs() > 3).float().mean().item()
    assert 0.0020 < tail < 0.0034  # P(|z| > 3) = 0.0027


# --- Haze model, JPEG codec, mixed chains -------------------------------------------------


def test_haze_is_scattering_model_with_the_transmission_used():
    clean = package_photos()
    degrader = Degrader()
    specs = [Spec("haze", params={"beta": b, "airlight": a}) for b, a in [(0.04, 0.8), (0.1, 0.9), (0.15, 0.95), (0.2, 1.0)]]
    hazy, labels = degrader(clean, keys_for(4), specs=specs)
    beta = torch.tensor([s.params["beta"] for s in specs])
    airlight = torch.tensor([s.params["airlight"] for s in specs]).view(-1, 1, 1, 1)
    t = haze_module.transmission(beta, CROP, CROP, SampleRNG(labels.seeds, "cpu"))
    assert 0.05 < t.min() < t.max() < 0.97  # a real, spatially varying transmission
    torch.testing.assert_close(hazy, clean * t + airlight * (1 - t), atol=1e-6, rtol=0)
    assert torch.isnan(labels.severity).all()  # explicit parameters carry no severity


def pil_jpeg(image: torch.Tensor, quality: int) -> torch.Tensor:
    array = image.mul(255).round().byte().permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
    decoded = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
    return torch.from_numpy(decoded.copy()).permute(2, 0, 1).float().div(255)


# PSNR between this engine and PIL at the same quality. Both use libjpeg(-turbo) with the
# same tables and 4:2:0 chroma, and agree bit for bit on the CPU here; the margin leaves
# room for another libjpeg build whose IDCT rounds differently.
JPEG_TOLERANCE_DB = 45.0


@pytest.mark.parametrize("quality", [10, 30, 60, 90])
def test_jpeg_matches_pil_at_the_same_quality(quality):
    clean = package_photos(128)
    out, labels = Degrader()(clean, keys_for(4), specs=[Spec("jpeg", params={"quality": quality})] * 4)
    reference = torch.stack([pil_jpeg(img, quality) for img in clean])
    agreement = psnr(out, reference)
    assert (agreement > JPEG_TOLERANCE_DB).all(), agreement
    # and the codec did compress: far from the clean image at low quality
    assert (psnr(out, clean) < agreement - 10).all()


def test_mixed_chains_two_or_three_distinct_types_in_random_order():
    degrader = Degrader(DegradationConfig(seed=1))
    clean = package_photos(64)[[0, 1, 2, 3] * 3]
    out, labels = degrader(clean, keys_for(12), specs=[Spec("mixed", severity=0.5)] * 12)
    chains = [[s["type"] for s in p["steps"]] for p in labels.params]
    assert all(2 <= len(c) <= 3 and len(set(c)) == len(c) and "mixed" not in c for c in chains)
    assert len({tuple(c) for c in chains}) > 6
    # An explicit chain equals running its steps one after the other with their parameters.
    spec = Spec("mixed", severity=0.5, chain=["haze", "gaussian_noise"])
    mixed, mixed_labels = degrader(clean[:1], ["k"], specs=[spec])
    steps = mixed_labels.params[0]["steps"]
    assert [s["type"] for s in steps] == ["haze", "gaussian_noise"]
    assert steps[1]["params"] == {"sigma": 37.5}


def test_noise_named_levels_and_explicit_params():
    degrader = Degrader()
    clean = package_photos(64)[:3]
    specs = [Spec("gaussian_noise", level=lv) for lv in ("sigma15", "sigma25", "sigma50")]
    _, labels = degrader(clean, keys_for(3), specs=specs)
    assert [p["sigma"] for p in labels.params] == [15.0, 25.0, 50.0]
    assert labels.severity.tolist() == pytest.approx([0.2, 1 / 3, 2 / 3])
    with pytest.raises(ValueError, match="missing"):
        degrader(clean[:1], ["k"], specs=[Spec("rain", params={"density": 0.01})])
    with pytest.raises(ValueError, match="no level"):
        degrader(clean[:1], ["k"], specs=[Spec("jpeg", level="sigma25")])


# --- Configuration and contact sheet -----------------------------------------------------------


def test_config_from_mapping_and_errors_name_the_key():
    cfg = from_dict(
        DegradationConfig,
        {
            "seed": 4,
            "mixture": {"gaussian_noise": 3, "haze": 1, "rain": 120},
            "severity": {"distribution": "beta", "beta_a": 2, "beta_b": 5},
            "type_severity": {"gaussian_noise": {"distribution": "levels", "levels": ["sigma15", "sigma25", "sigma50"]}},
        },
        "job.yaml",
    )
    specs = Degrader(cfg).sample_specs(keys_for(200))
    noise = [s for s in specs if s.type == "gaussian_noise"]
    assert noise and all(s.level in ("sigma15", "sigma25", "sigma50") for s in noise)
    assert sum(s.type == "rain" for s in specs) > 150
    with pytest.raises(ConfigError, match="unknown degradation 'snow'"):
        from_dict(DegradationConfig, {"mixture": {"snow": 1.0}})
    with pytest.raises(ConfigError, match="sigma25"):
        from_dict(DegradationConfig, {"mixture": {"haze": 1.0}, "severity": {"distribution": "levels", "levels": ["sigma25"]}})
    with pytest.raises(ConfigError, match="severity.high"):
        from_dict(DegradationConfig, {"severity": {"high": "strong"}})


def test_contact_sheet_renders_every_type_and_level(tmp_path):
    out = tmp_path / "sheet.png"
    sheet.main(["--out", str(out), "--tile", "48", "--photo", "chelsea"])
    image = Image.open(out)
    assert image.size == (3 * 48, (len(names()) + 1) * (48 + sheet.LABEL_HEIGHT))


# --- CPU and CUDA (runs where a GPU is present) ------------------------------------------------

POINTWISE_TYPES = {"gaussian_noise", "poisson_gaussian_noise", "haze", "low_light"}
CUDA_POINTWISE_ATOL = 1e-5  # log/sqrt/cos/pow/exp rounding on each device
CUDA_FFT_ATOL = 1e-4  # float32 FFTs (pocketfft/MKL vs cuFFT) on 288-point transforms
CUDA_CODEC_PSNR_DB = 40.0  # nvJPEG vs libjpeg, and any chain that contains JPEG


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_and_cuda_agree_within_the_documented_tolerance():
    clean = package_photos(96)
    degrader = Degrader(DegradationConfig(seed=2))
    for name in names():
        specs = [Spec(name, severity=0.6)] * len(clean)
        on_cpu, labels_cpu = degrader(clean, keys_for(len(clean)), specs=specs)
        on_gpu, labels_gpu = degrader(clean.cuda(), keys_for(len(clean)), specs=specs)
        assert on_gpu.device.type == "cuda" and labels_gpu.type_index.device.type == "cuda"
        assert labels_cpu.params == labels_gpu.params
        on_gpu = on_gpu.cpu()
        if name in POINTWISE_TYPES:
            torch.testing.assert_close(on_gpu, on_cpu, atol=CUDA_POINTWISE_ATOL, rtol=0, msg=name)
        elif name in ("gaussian_blur", "motion_blur", "rain"):
            torch.testing.assert_close(on_gpu, on_cpu, atol=CUDA_FFT_ATOL, rtol=0, msg=name)
        else:
            assert (psnr(on_gpu, on_cpu) > CUDA_CODEC_PSNR_DB).all(), name


# --- The benchmark's per-image reference is the same degradation ----------------------------


def _load_benchmark():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_degrade.py"
    spec = importlib.util.spec_from_file_location("bench_degrade", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_reference_implements_the_same_degradations():
    bench = _load_benchmark()
    clean = bench.real_batch(4, 128)
    as_numpy = clean.permute(0, 2, 3, 1).numpy().copy()
    degrader = Degrader(DegradationConfig(seed=4))
    for name in names():
        out, labels = degrader(clean, keys_for(4), specs=[Spec(name, severity=0.5)] * 4)
        ref = torch.from_numpy(np.stack(bench.per_image(as_numpy, labels.params, labels.seeds, name))).permute(0, 3, 1, 2)
        ref = ref.float()
        if name in ("gaussian_blur", "motion_blur", "jpeg"):  # nothing random: the same image
            assert (psnr(out, ref) > 45).all(), name
        else:  # another random realisation of the same process: the same damage on average
            engine_db, reference_db = psnr(out, clean).mean(), psnr(ref, clean).mean()
            assert abs(engine_db - reference_db) < 1.0, (name, engine_db, reference_db)


def test_fft_blur_equals_direct_convolution_with_mirrored_borders():
    import kornia

    from perceive_ir.degrade.kernels import centred_grid, gaussian_kernel

    clean = package_photos(64)
    theta = torch.tensor([0.0, 0.5, 1.2, 2.8])
    major, minor, size = torch.full((4,), 2.5), torch.tensor([2.5, 1.0, 0.8, 1.5]), torch.tensor([21.0, 15.0, 9.0, 21.0])
    params = {"sigma_major": major, "sigma_minor": minor, "theta": theta, "size": size}
    specs = [Spec("gaussian_blur", params={k: float(v[i]) for k, v in params.items()}) for i in range(4)]
    blurred, _ = Degrader()(clean, keys_for(4), specs=specs)
    kernels = gaussian_kernel(major, minor, theta, size, *centred_grid(10, clean.device))[:, 0]
    direct = kornia.filters.filter2d(clean, kernels, border_type="reflect")
    torch.testing.assert_close(blurred, direct.clamp(0, 1), atol=1e-5, rtol=0)
    assert (psnr(blurred, clean) < 30).all()
