"""Run storage for Ray Train: a local folder, or s3:// with an optional endpoint override."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from perceive_ir.orchestration.config import RunStorageConfig

__all__ = ["StorageUnreachable", "run_storage"]


class StorageUnreachable(ConnectionError):
    """The run storage cannot be listed (wrong bucket, endpoint or credentials)."""


def run_storage(cfg: RunStorageConfig):
    """``(storage_path, pyarrow filesystem or None)`` for ``RunConfig``; checked to be reachable."""
    if cfg.path.startswith("s3://"):
        from pyarrow import fs

        kwargs = {}
        if cfg.endpoint_url:
            endpoint = urlsplit(cfg.endpoint_url)
            kwargs = {"endpoint_override": endpoint.netloc, "scheme": endpoint.scheme or "https"}
        filesystem = fs.S3FileSystem(**kwargs)  # credentials: the usual AWS environment / instance role
        path = cfg.path[len("s3://"):].rstrip("/")
        bucket = path.split("/", 1)[0]
        try:
            info = filesystem.get_file_info(bucket)
        except OSError as err:
            raise StorageUnreachable(f"run storage '{cfg.path}' (from 'storage.path', endpoint "
                                     f"{cfg.endpoint_url or 'AWS'}) cannot be reached: {err}") from None
        if info.type == fs.FileType.NotFound:
            raise StorageUnreachable(f"run storage '{cfg.path}' (from 'storage.path'): bucket '{bucket}' does not exist "
                                     f"at {cfg.endpoint_url or 'AWS'}")
        return path, filesystem
    if "://" in cfg.path and not cfg.path.startswith("file://"):
        raise ValueError(f"storage.path '{cfg.path}': use a local folder or s3://bucket/prefix")
    local = Path(cfg.path.removeprefix("file://")).expanduser().resolve()
    local.mkdir(parents=True, exist_ok=True)
    return str(local), None

