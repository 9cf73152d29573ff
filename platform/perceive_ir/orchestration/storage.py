"""Run storage for Ray Train: a local folder, or s3:// with an optional endpoint override."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit

from perceive_ir.data.storage import ENDPOINT_VARIABLE
from perceive_ir.orchestration.config import RunStorageConfig

__all__ = ["StorageUnreachable", "run_storage"]


class StorageUnreachable(ConnectionError):
    """The run storage cannot be listed (wrong bucket, endpoint or credentials)."""


def run_storage(cfg: RunStorageConfig):
    """``(storage_path, pyarrow filesystem or None)`` for ``RunConfig``; checked to be reachable."""
    if cfg.path.startswith("s3://"):
        from pyarrow import fs

        kwargs = {}
        # pyarrow's S3 does not read botocore's endpoint variable: taken here when the config sets none
        url = cfg.endpoint_url or os.environ.get(ENDPOINT_VARIABLE)
        where = cfg.endpoint_url or (f"{url} (from {ENDPOINT_VARIABLE})" if url else "AWS")
        if url:
            endpoint = urlsplit(url)
            kwargs = {"endpoint_override": endpoint.netloc, "scheme": endpoint.scheme or "https"}
        filesystem = fs.S3FileSystem(**kwargs)  # credentials: the usual AWS environment / instance role
        path = cfg.path[len("s3://"):].rstrip("/")
        bucket = path.split("/", 1)[0]
        try:
            info = filesystem.get_file_info(bucket)
        except OSError as err:
            raise StorageUnreachable(f"run storage '{cfg.path}' (from 'storage.path', endpoint {where}) cannot be "
                                     f"reached: {err}") from None
        if info.type == fs.FileType.NotFound:
            raise StorageUnreachable(f"run storage '{cfg.path}' (from 'storage.path'): bucket '{bucket}' does not exist "
                                     f"at {where}")
        return path, filesystem
    if "://" in cfg.path and not cfg.path.startswith("file://"):
        raise ValueError(f"storage.path '{cfg.path}': use a local folder or s3://bucket/prefix")
    local = Path(cfg.path.removeprefix("file://")).expanduser().resolve()
    local.mkdir(parents=True, exist_ok=True)
    return str(local), None

