"""What a user does with their object store before the first step: create the buckets the manifests
name, and copy raw datasets into the raw bucket."""

from __future__ import annotations

import re
from pathlib import Path

__all__ = ["bucket_names", "s3_client", "upload_folder", "count_objects", "complete_checkpoints"]

_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


def bucket_names(docs: list[dict]) -> list[str]:
    """Every bucket an ``s3://`` URL of the manifests names (settings and job arguments)."""
    import yaml

    return sorted(set(re.findall(r"s3://([a-z0-9][a-z0-9.-]{1,61}[a-z0-9])", yaml.safe_dump_all(docs))))


def s3_client(endpoint: str, key_id: str, secret: str):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=key_id, aws_secret_access_key=secret,
                        region_name="us-east-1")


def upload_folder(client, folder: Path, url: str, limit: int | None = None) -> int:
    """The images of ``folder`` (recursively, relative paths kept) under ``s3://bucket/prefix``."""
    bucket, _, prefix = url[len("s3://"):].partition("/")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES)[:limit]
    for path in files:
        client.upload_file(str(path), bucket, f"{prefix.rstrip('/')}/{path.relative_to(folder).as_posix()}")
    return len(files)


def count_objects(client, bucket: str, prefix: str = "", contains: str = "") -> int:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sum(1 for page in pages for obj in page.get("Contents", []) if contains in obj["Key"])


def complete_checkpoints(client, bucket: str, prefix: str, ranks: int) -> int:
    """Checkpoint folders under ``prefix`` whose every rank wrote its index (``index_rank<r>.json``, the
    last file a rank writes: see ``perceive_ir.train.checkpoint_index``)."""
    folders: dict[str, set[str]] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            parts = obj["Key"].split("/")
            folder = next((i for i, part in enumerate(parts) if part.startswith("checkpoint_")), None)
            if folder is not None and parts[-1].startswith("index_rank"):
                folders.setdefault("/".join(parts[:folder + 1]), set()).add(parts[-1])
    return sum(1 for indexes in folders.values() if len(indexes) >= ranks)


def checkpoint_world_sizes(client, bucket: str, prefix: str) -> list[int]:
    """The world size of every checkpoint under ``prefix`` (its ``trainer_state.json``), by step."""
    import json

    states = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            if obj["Key"].endswith("/trainer_state.json"):
                try:
                    states.append(json.loads(client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()))
                except ValueError:
                    continue
    return [s["world_size"] for s in sorted(states, key=lambda s: s["step"])]
