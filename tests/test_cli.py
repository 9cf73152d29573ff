"""The command lines against moto's S3 server on loopback and against a closed port: one way to give
the S3 endpoint everywhere (``--endpoint-url``, ``$AWS_ENDPOINT_URL``, ``--option``), one line and
exit code 1 when the store does not answer, and no traceback from library clean-up at exit."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import REPO, _free_port
from perceive_ir.data.storage import filesystem

SHARDS_CLI = [sys.executable, "-m", "dataset_tools.cli"]
EXIT_NOISE = ("Traceback", "attached to a different loop", "Exception ignored", "Unclosed")


def run(args: list[str], endpoint_variable: str | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "AWS_ENDPOINT_URL"}
    env.update(AWS_MAX_ATTEMPTS="1", HF_HUB_OFFLINE="1")  # an unreachable endpoint fails at once
    if endpoint_variable:
        env["AWS_ENDPOINT_URL"] = endpoint_variable
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def assert_clean_exit(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not any(noise in proc.stderr for noise in EXIT_NOISE), proc.stderr[-3000:]


@pytest.fixture(scope="module")
def shards(package_photos, s3_module_bucket):
    """Photos uploaded to S3, then built into shards there by the CLI given ``--endpoint-url``."""
    bucket, options = s3_module_bucket
    fs, _ = filesystem(bucket, options)
    for photo in sorted(package_photos.iterdir())[:4]:
        fs.put_file(str(photo), f"{bucket}/photos/{photo.name}")
    build = run(SHARDS_CLI + ["build", f"{bucket}/shards", "--clean", f"{bucket}/photos", "--dataset", "pkg",
                              "max_side=96", "max_samples_per_shard=2", "workers=2", "progress=false",
                              "--endpoint-url", options["endpoint_url"]])
    assert_clean_exit(build)
    assert "4 samples in 2 shards" in build.stdout
    return f"{bucket}/shards", options["endpoint_url"]


def test_verify_takes_the_endpoint_from_aws_endpoint_url(shards):
    location, endpoint = shards
    proc = run(SHARDS_CLI + ["verify", location], endpoint_variable=endpoint)
    assert_clean_exit(proc)
    assert "OK: 2 shards, 4 samples, 0 problems" in proc.stdout


def test_inspect_takes_the_endpoint_as_a_storage_option(shards):
    location, endpoint = shards
    proc = run(SHARDS_CLI + ["inspect", location, "--json", "--option", f"endpoint_url={endpoint}"])
    assert_clean_exit(proc)
    assert '"pkg/train/clean": 4' in proc.stdout


def test_streaming_from_s3_exits_without_a_traceback(shards):
    location, endpoint = shards
    script = (
        "from perceive_ir.data.pipeline import LoaderConfig, ShardSourceConfig, build_loader\n"
        f"cfg = LoaderConfig(sources=[ShardSourceConfig({location!r})], patch_size=32, batch_size=2,\n"
        "                   samples_per_epoch=64, num_workers=2)\n"
        "batches = iter(build_loader(cfg))\n"
        "print(next(batches)['gt'].shape[0], next(batches)['gt'].shape[0])\n"  # left part-way, as a job that stops
    )
    proc = run([sys.executable, "-c", script], endpoint_variable=endpoint)
    assert_clean_exit(proc)
    assert proc.stdout.split() == ["2", "2"]


def _closed_endpoint() -> str:
    return f"http://127.0.0.1:{_free_port()}"


UNREACHABLE = {
    "build": lambda tmp, url: SHARDS_CLI + ["build", "s3://bucket/out", "--clean", str(tmp), "--dataset", "x",
                                            "--endpoint-url", url],
    "verify": lambda tmp, url: SHARDS_CLI + ["verify", "s3://bucket/shards", "--endpoint-url", url],
    "inspect": lambda tmp, url: SHARDS_CLI + ["inspect", "s3://bucket/shards", "--option", f"endpoint_url={url}"],
    "stage2": lambda tmp, url: [sys.executable, "jobs/stage2.py", "--config", "configs/stage2_tiny.yaml",
                                "perceiver=x", "medium_tier=x", "data.train.sources=[{location: s3://bucket/shards}]",
                                f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}", "--endpoint-url", url],
}


@pytest.mark.parametrize("command", sorted(UNREACHABLE))
def test_an_unreachable_endpoint_is_one_line_and_exit_code_1(command, package_photos, tmp_path):
    url = _closed_endpoint()
    proc = run(UNREACHABLE[command](package_photos, url) if command != "stage2" else UNREACHABLE[command](tmp_path, url))
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    prefix = "stage2: pre-flight: 'data.train.sources[0].location'" if command == "stage2" else \
        f"perceive-shards {command}: error:"
    assert lines[-1].startswith(prefix) and url in lines[-1], lines
    if command != "stage2":
        assert len(lines) == 1, lines


def test_several_build_configs_are_built_in_order_and_a_finished_set_is_confirmed(package_photos, tmp_path):
    photos = sorted(package_photos.iterdir())
    configs = []
    for k, (name, picked) in enumerate((("first", photos[:2]), ("second", photos[2:5]))):
        folder = tmp_path / f"photos{k}"
        folder.mkdir()
        for photo in picked:
            (folder / photo.name).write_bytes(photo.read_bytes())
        config = tmp_path / f"{name}.yaml"
        config.write_text(f"output: {tmp_path / name}\nsources: [{{dataset: {name}, clean: {folder}}}]\n")
        configs += ["--config", str(config)]
    build = run(SHARDS_CLI + ["build", *configs, "max_side=64", "progress=false"])
    assert_clean_exit(build)
    assert f"{tmp_path / 'first'}: 2 samples" in build.stdout and f"{tmp_path / 'second'}: 3 samples" in build.stdout
    again = run(SHARDS_CLI + ["build", *configs, "max_side=64", "progress=false"])
    assert_clean_exit(again)
    assert again.stderr.count("already complete") == 2
    # a wrong key fails before anything is built, naming it; one output with several files is refused
    broken = tmp_path / "broken.yaml"
    broken.write_text(f"output: {tmp_path / 'third'}\nsources: [{{dataset: x, clean: {tmp_path}}}]\ntile: 3\n")
    wrong = run(SHARDS_CLI + ["build", "--config", str(broken), *configs, "progress=false"])
    assert wrong.returncode == 2 and "tile" in wrong.stderr and not (tmp_path / "third").exists()
    two = run(SHARDS_CLI + ["build", str(tmp_path / "out"), *configs])
    assert two.returncode == 2 and "each file names its own" in two.stderr
