"""The stage-1 products a job reads, resolved once by the driver and staged in the run's storage.

Workers start many times in a run (failures, resizes, preemptions); none of those starts may
depend on the tracking server. The driver downloads each MLflow URI (``runs:/``, ``models:/``)
before Ray Train starts and copies the folder to ``<run storage>/<run name>/inputs/<product>``;
workers copy it from there into their node's cache (once per node and staged version).
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path
from typing import Any

from perceive_ir.data.node_cache import cached_download
from perceive_ir.orchestration.config import JobConfig
from perceive_ir.products.locations import URI_SCHEMES, resolve_product

log = logging.getLogger(__name__)

__all__ = ["stage_products", "staged_folder", "STAGED_PRODUCTS"]

STAGED_PRODUCTS = ("perceiver", "medium_tier")


def _folder_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode())
        digest.update(str(path.stat().st_size).encode())
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def stage_products(cfg: JobConfig, tracking_uri: str | None, storage_path: str, filesystem) -> dict[str, dict[str, Any]]:
    """``{product: {"path": <in run storage>, "digest": ...}}`` for every product given as an MLflow URI."""
    import pyarrow.fs

    staged = {}
    for key in STAGED_PRODUCTS:
        location = getattr(cfg, key, None)
        if not isinstance(location, str) or not location.startswith(URI_SCHEMES):
            continue  # a folder is read where it is; nothing to resolve
        folder = resolve_product(location, key.replace("_", " "), key, tracking_uri)
        digest = _folder_digest(folder)
        target = f"{storage_path.rstrip('/')}/{cfg.name}/inputs/{key}-{digest}"
        if filesystem is None:
            shutil.copytree(folder, target, dirs_exist_ok=True)
        else:
            pyarrow.fs.copy_files(str(folder), target, destination_filesystem=filesystem)
        staged[key] = {"path": target, "digest": digest, "source": location}
        log.info("%s %s staged in the run storage at %s", key, location, target)
    return staged


def staged_folder(entry: dict[str, Any], filesystem) -> Path:
    """The local folder of a staged product: itself on local storage, else a copy in the node's cache."""
    import pyarrow.fs

    if filesystem is None:
        return Path(entry["path"])

    def fetch(folder: Path) -> Path:
        target = folder / "product"
        target.mkdir()
        pyarrow.fs.copy_files(entry["path"], str(target), source_filesystem=filesystem,
                              destination_filesystem=pyarrow.fs.LocalFileSystem(use_mmap=False))
        return target

    # keyed by content: the same product staged by several runs (a stage, then a search's trials) is
    # copied to the node once
    return cached_download({"staged_product": entry["digest"]}, fetch)
