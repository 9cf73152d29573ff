"""Batch restoration (jobs/restore.py) on real Ray Data: a tiny restorer and perceiver registered in a
SQLite MLflow, real photo crops in every format and bit depth, moto's S3 server for the URL case, a
job killed with SIGKILL and relaunched. One local Ray and one registry serve the whole module."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from _model_fixtures import TINY_NAFNET, tiny_clip_file, tiny_perceiver
from conftest import REPO
from perceive_ir.config import load_config
from perceive_ir.orchestration.preflight import PreflightError
from perceive_ir.workflows.restoration import RestoreConfig, plan_restoration, run_restoration
from perceive_ir.workflows.restoration.codecs import decode_pixels, png16_bytes, to_unit_rgb
from perceive_ir.workflows.restoration.records import RECORD_COLUMNS, read_records

CONFIG = REPO / "configs" / "restore.yaml"
H, W = 40, 56  # tiny crops: the tests measure behaviour, not speed


def crop(name: str, top: int = 120, left: int = 180) -> np.ndarray:
    from skimage import data

    image = np.asarray(getattr(data, name)())[top:top + H, left:left + W]
    return np.ascontiguousarray(image if image.ndim == 2 else image[..., :3])


def pil_bytes(pixels: np.ndarray, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **options)
    return buffer.getvalue()


def tiff_bytes(pixels: np.ndarray) -> bytes:
    import tifffile

    buffer = io.BytesIO()
    tifffile.imwrite(buffer, pixels, photometric="rgb" if pixels.ndim == 3 else "minisblack")
    return buffer.getvalue()


def collection() -> dict[str, bytes]:
    """One real photo crop in each format and bit depth, in nested folders, plus three bad files."""
    rgb = crop("astronaut")
    wide = (rgb.astype(np.uint16) * 257 + np.arange(W, dtype=np.uint16)[None, :, None] * 3)  # uses the low bits
    grey = crop("camera")
    files = {
        "png8.png": pil_bytes(rgb, "PNG"),
        "deep/png16.png": png16_bytes(wide),
        "deep/grey8.png": pil_bytes(grey, "PNG"),
        "deep/grey16.png": png16_bytes(grey.astype(np.uint16)[..., None] * 257),
        "rgba.png": pil_bytes(np.dstack([rgb, np.full((H, W), 200, np.uint8)]), "PNG"),
        "tiff/t8.tif": tiff_bytes(rgb),
        "tiff/t16.tiff": tiff_bytes(wide),
        "tiff/float.tif": tiff_bytes(rgb.astype(np.float32) / 255),  # the restorer's output, exactly
        "photo.JPG": pil_bytes(rgb, "JPEG", quality=92),
        "bitmap.bmp": pil_bytes(rgb, "BMP"),
    }
    files["bad/zero.png"] = b""
    files["bad/truncated.jpg"] = files["photo.JPG"][: len(files["photo.JPG"]) // 2]
    files["bad/not_an_image.png"] = b"this is text, not a PNG" * 4
    return files


def write_folder(folder: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return folder


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A tiny restorer and its perceiver, registered as a pair; the restorer is @champion."""
    from mlflow.tracking import MlflowClient

    from perceive_ir import products
    from perceive_ir.models import RestorerConfig
    from perceive_ir.registry.registration import register_product

    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    cfg = RestorerConfig(backbone={"name": "nafnet", "params": TINY_NAFNET}, conditioning={"name": "none"})
    torch.manual_seed(3)
    restorer = products.save_restorer(cfg.build().eval(), cfg, root / "restorer")
    perceiver = tiny_perceiver(tiny_clip_file(root / "clip.safetensors", seed=1))
    perceiver_folder = products.save_perceiver(perceiver, perceiver.cfg, root / "perceiver")
    client = MlflowClient(tracking_uri=uri)
    run = client.create_run(client.create_experiment("train", artifact_location=str(root / "artifacts"))).info.run_id
    perceiver_uri = register_product(uri, run, perceiver_folder, "tiny-perceiver", {"lineage.product": "perceiver"},
                                     alias="champion")
    register_product(uri, run, restorer, "tiny-restorer", {"lineage.product": "restorer",
                                                           "lineage.perceiver": perceiver_uri}, alias="champion")
    return {"uri": uri, "root": root, "restorer": "models:/tiny-restorer@champion", "perceiver": perceiver_uri}


@pytest.fixture(scope="module")
def ray_session(s3_endpoint):
    """One local Ray for the module (started after the S3 server: its workers inherit the credentials).
    Its authentication mode is the one this process started with (Ray reads it once, at import): token
    authentication when the environment asks for it, else none, so that a job in a subprocess, which
    inherits the mode, joins it."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        # the loopback address: a job told this address is on this machine and may read its folders
        yield "127.0.0.1:" + ray.get_runtime_context().gcs_address.rsplit(":", 1)[1]
    finally:
        ray.shutdown()


def restore_config(registry, **settings) -> RestoreConfig:
    overrides = [f"model={registry['restorer']}", f"tracking.uri={registry['uri']}", "progress=false",
                 "tracking.experiment=restore-tests"] + [f"{k}={v}" for k, v in settings.items()]
    return load_config(RestoreConfig, CONFIG, overrides)


@pytest.fixture(scope="module")
def first_run(registry, ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("formats")
    files = collection()
    inputs = write_folder(root / "in", files)
    cfg = restore_config(registry, input=inputs, output=root / "out", batch_images=4)
    return cfg, run_restoration(cfg), files


def test_every_format_and_bit_depth_comes_back_as_it_went_in(first_run):
    cfg, result, files = first_run
    out = Path(cfg.output)
    good = [name for name in files if not name.startswith("bad/")]
    for name in good:
        before, after = decode_pixels(files[name], name), decode_pixels((out / name).read_bytes(), name)
        assert after.format == before.format, name
        assert after.pixels.dtype == before.pixels.dtype and after.pixels.shape == before.pixels.shape, name
    # alpha carried over unchanged; grey stays grey; 16 bits really used
    assert np.array_equal(decode_pixels((out / "rgba.png").read_bytes()).pixels[..., 3], np.full((H, W), 200))
    assert len(np.unique(decode_pixels((out / "deep/png16.png").read_bytes()).pixels % 257)) > 1
    assert not list(out.rglob("*.partial")), "a temporary file was left visible"
    report = result.report
    assert sorted(report["path"]) == sorted(files) and report["path"].is_unique
    assert set(report.loc[report["status"] == "restored", "path"]) == set(good)


def test_outputs_equal_the_registered_models_predict(first_run, registry):
    """The float TIFF output is the restorer's output itself: it equals the pyfunc model's predict of
    the same image within 1e-6; 8- and 16-bit outputs are it rounded to their depth."""
    import mlflow

    cfg, _, files = first_run
    mlflow.set_tracking_uri(registry["uri"])
    try:
        model = mlflow.pyfunc.load_model(registry["restorer"])
    finally:
        mlflow.set_tracking_uri(None)
    out = Path(cfg.output)
    expected = model.predict(crop("astronaut")[None])[0]
    restored = decode_pixels((out / "tiff/float.tif").read_bytes()).pixels
    assert np.abs(restored - expected).max() <= 1e-6
    assert np.abs(decode_pixels((out / "png8.png").read_bytes()).pixels / 255.0 - expected).max() <= 0.5 / 255 + 1e-6
    wide = decode_pixels(files["deep/png16.png"]).pixels
    expected16 = model.predict(to_unit_rgb(wide)[None])[0]
    got16 = decode_pixels((out / "deep/png16.png").read_bytes()).pixels / 65535.0
    assert np.abs(got16 - expected16).max() <= 0.5 / 65535 + 1e-6


def test_bad_inputs_are_skipped_and_listed_with_their_reason(first_run):
    _, result, _ = first_run
    reasons = dict(result.skipped)
    assert set(reasons) == {"bad/zero.png", "bad/truncated.jpg", "bad/not_an_image.png"}
    assert "empty file" in reasons["bad/zero.png"] and "truncated" in reasons["bad/truncated.jpg"].lower()
    assert "cannot identify" in reasons["bad/not_an_image.png"]


def test_the_report_its_columns_and_the_mlflow_run(first_run, registry):
    from mlflow.tracking import MlflowClient

    import pandas as pd

    cfg, result, _ = first_run
    folder = Path(cfg.output) / "_restore"
    table = pd.read_parquet(folder / "report.parquet")
    assert list(table.columns) == list(RECORD_COLUMNS)
    assert list(pd.read_csv(folder / "report.csv").columns) == list(RECORD_COLUMNS)
    restored = table[table["status"] == "restored"]
    assert restored[["quality_in", "quality_out", "seconds"]].notna().all().all()  # the pair's perceiver scored
    assert (restored["flagged"] == (restored["quality_out"] < restored["quality_in"])).all()
    assert (restored["height"] == H).all() and (restored["width"] == W).all()
    assert set(restored["depth"]) == {"8", "16", "32f"}
    assert (folder / "scores.png").stat().st_size > 0
    run = MlflowClient(tracking_uri=registry["uri"]).get_run(result.run_id)
    assert run.data.tags["restore.model_name"] == "tiny-restorer" and run.data.tags["restore.model_version"] == "1"
    assert run.data.tags["restore.perceiver"] == registry["perceiver"]
    assert run.data.metrics["restore/restored"] == 10 and run.data.metrics["restore/skipped"] == 3
    assert "restore/images_per_s" in run.data.metrics and "restore/flagged_share" in run.data.metrics


def test_a_relaunch_skips_what_is_done_and_redoes_a_truncated_output(first_run):
    cfg, _, _ = first_run
    cut = Path(cfg.output) / "tiff/t16.tiff"
    cut.write_bytes(cut.read_bytes()[:100])  # truncated behind the job's back: its record no longer matches
    plan = plan_restoration(cfg)
    assert plan.todo == ["bad/not_an_image.png", "bad/truncated.jpg", "bad/zero.png", "tiff/t16.tiff"]
    again = run_restoration(cfg, plan=plan)
    assert again.summary["launch_restored"] == 1 and again.summary["already_done"] == 9
    assert decode_pixels(cut.read_bytes()).pixels.dtype == np.uint16
    assert again.report["path"].is_unique and len(again.report) == 13


def test_a_job_killed_with_sigkill_then_relaunched_restores_every_image_once(registry, ray_session, tmp_path):
    photos = [crop(name, top, left) for name in ("astronaut", "coffee", "chelsea")
              for top, left in ((0, 0), (60, 40), (120, 100), (200, 160))]
    inputs = write_folder(tmp_path / "in", {f"f{k // 4}/img{k:02d}.png": pil_bytes(p, "PNG")
                                            for k, p in enumerate(photos * 2)})
    output = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO / "platform")}  # the session's authentication mode too
    command = [sys.executable, str(REPO / "jobs" / "restore.py"), f"model={registry['restorer']}", f"input={inputs}",
               f"output={output}", f"tracking.uri={registry['uri']}", f"ray.address={ray_session}", "progress=false",
               "batch_images=1", "decode_batch=1", "perceiver=none"]
    job = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    records = output / "_restore" / "records"
    deadline = time.time() + 90
    while not (records.is_dir() and len(list(records.glob("part-*.parquet"))) >= 2):
        assert job.poll() is None, f"the job ended before it was killed: {job.stderr.read().decode()[-2000:]}"
        assert time.time() < deadline, "no record was written in 90 s"
        time.sleep(0.2)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    before = read_records(str(output), {})
    assert 0 < len(before) < 24, "the kill came too late to interrupt the job"
    cfg = restore_config({**registry}, input=inputs, output=output, perceiver="none")
    result = run_restoration(cfg)
    report = result.report
    assert len(report) == 24 and report["path"].is_unique and (report["status"] == "restored").all()
    assert result.summary["already_done"] >= len(before[before["status"] == "restored"]) - 1
    assert result.summary["launch_restored"] + result.summary["already_done"] == 24
    for path in report["path"]:
        assert decode_pixels((output / path).read_bytes(), path).pixels.shape == (H, W, 3)
    assert not list(output.rglob("*.partial"))


def test_a_bucket_in_and_a_bucket_out(registry, ray_session, s3_bucket):
    from perceive_ir.data.storage import filesystem

    bucket, options = s3_bucket
    fs, _ = filesystem(bucket, options)
    for name, data in {"a/one.png": pil_bytes(crop("coffee"), "PNG"), "two.jpg": pil_bytes(crop("chelsea"), "JPEG")}.items():
        fs.pipe_file(f"{bucket}/in/{name}", data)
    cfg = restore_config(registry, input=f"{bucket}/in", output=f"{bucket}/out",
                         storage_options=f"{{endpoint_url: {options['endpoint_url']}}}")
    result = run_restoration(cfg)
    assert result.summary["restored"] == 2
    assert decode_pixels(fs.cat_file(f"{bucket}/out/a/one.png")).format == "PNG"
    assert decode_pixels(fs.cat_file(f"{bucket}/out/two.jpg")).format == "JPEG"
    assert fs.exists(f"{bucket}/out/_restore/report.parquet") and fs.exists(f"{bucket}/out/_restore/report.csv")


def test_preflight_refuses_an_unwritable_output_before_any_model_and_a_perceiver_as_the_model(registry, tmp_path,
                                                                                             monkeypatch):
    import perceive_ir.workflows.restoration.job as job

    inputs = write_folder(tmp_path / "in", {"x.png": pil_bytes(crop("coffee"), "PNG")})
    (tmp_path / "a_file").write_text("")

    def no_models(*args, **kwargs):
        raise AssertionError("a model was resolved before the output was checked")

    with monkeypatch.context() as patch:
        patch.setattr(job, "resolve_models", no_models)
        with pytest.raises(PreflightError, match=r"'output': '.*a_file/out' cannot be written"):
            plan_restoration(restore_config(registry, input=inputs, output=tmp_path / "a_file" / "out"))
    with pytest.raises(PreflightError, match=r"'model': 'models:/tiny-perceiver/1' \(model tiny-perceiver version 1\) "
                                             r"is a perceiver, not a restorer"):
        plan_restoration(restore_config(registry, input=inputs, output=tmp_path / "out", model=registry["perceiver"]))
    with pytest.raises(PreflightError, match=r"'input': .*holds no image"):
        plan_restoration(restore_config(registry, input=tmp_path / "out", output=tmp_path / "out2"))
