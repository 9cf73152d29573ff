"""Shared fixtures: real photos from installed packages, the benchmark images, and a real
S3 protocol server (moto) on loopback."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATASETS = REPO.parent / "shared" / "datasets"


def shared_dataset(name: str) -> Path:
    """A benchmark folder from ../shared/datasets, or a skip that says it is absent."""
    path = SHARED_DATASETS / name
    if not path.is_dir():
        pytest.skip(f"benchmark images not found at ../shared/datasets/{name} (CI always has them)")
    return path


@pytest.fixture(scope="session")
def package_photos(tmp_path_factory) -> Path:
    """A folder of the real photos that scikit-image, scikit-learn and matplotlib ship."""
    from perceive_ir.data.package_photos import copy_photos

    folder = tmp_path_factory.mktemp("package_photos")
    copy_photos(folder)
    return folder


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's S3 server on 127.0.0.1, stopped after the session. Yields its storage options."""
    from moto.server import ThreadedMotoServer

    # Dummy credentials for the local server; child processes (loader workers) inherit them.
    for name, value in {"AWS_ACCESS_KEY_ID": "local-test", "AWS_SECRET_ACCESS_KEY": "local-test",
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():
        os.environ.setdefault(name, value)
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield {"endpoint_url": f"http://127.0.0.1:{port}"}
    finally:
        server.stop()


@pytest.fixture()
def s3_bucket(s3_endpoint, request):
    """A fresh bucket on the local S3 server; yields (bucket URL, storage options)."""
    from perceive_ir.data.storage import filesystem

    name = "t-" + request.node.name.lower().replace("_", "-")[:40]
    fs, _ = filesystem(f"s3://{name}", s3_endpoint)
    fs.mkdir(name)
    return f"s3://{name}", dict(s3_endpoint)


@pytest.fixture(scope="module")
def s3_module_bucket(s3_endpoint, request):
    """A bucket on the local S3 server shared by one test module; yields (bucket URL, storage options)."""
    from perceive_ir.data.storage import filesystem

    name = "m-" + request.module.__name__.lower().replace("_", "-")[:40]
    fs, _ = filesystem(f"s3://{name}", s3_endpoint)
    fs.mkdir(name)
    return f"s3://{name}", dict(s3_endpoint)
