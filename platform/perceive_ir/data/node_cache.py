"""The node's download cache: files fetched once per node, then shared by every worker and trial on it.

Entries are keyed by the sha256 of an identity (a URI and what tells its versions apart); concurrent
callers on one node wait on a file lock, and a download goes to a partial folder renamed into place,
so no reader ever sees it half written.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from perceive_ir.weights import sha256_file

__all__ = ["node_cache", "product_cache", "cached_download"]

_CACHE_RECORD = ".product.json"


def node_cache() -> Path:
    """The node's cache: ``$PERCEIVE_IR_CACHE``, else one per user in the temporary folder."""
    default = Path(tempfile.gettempdir()) / "perceive_ir_cache" / str(os.getuid())
    return Path(os.environ.get("PERCEIVE_IR_CACHE") or default)


def product_cache() -> Path:
    """Downloaded products, shared by every worker and trial of the node."""
    return node_cache() / "products"


def cached_download(identity: dict, fetch: Callable[[Path], Path]) -> Path:
    """``fetch(folder)`` downloads into ``folder`` and returns the product's path inside it. The
    result is kept under the sha256 of ``identity``; concurrent callers of one node wait on a file
    lock, and a download goes to a partial folder renamed into place, so none sees it half written."""
    from filelock import FileLock

    root = product_cache()
    root.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:32]
    final = root / key
    with FileLock(str(root / f"{key}.lock")):
        found = _cached_product(final)
        if found is not None:
            return found
        for stale in root.glob(f".{key}.partial-*"):  # left by a process killed while downloading
            shutil.rmtree(stale, ignore_errors=True)
        shutil.rmtree(final, ignore_errors=True)
        partial = Path(tempfile.mkdtemp(prefix=f".{key}.partial-", dir=root))
        try:
            product = Path(fetch(partial)).resolve()
            files = {str(f.relative_to(partial)): f.stat().st_size for f in sorted(partial.rglob("*")) if f.is_file()}
            record = {"identity": identity, "product": str(product.relative_to(partial.resolve())), "files": files,
                      "sha256": {name: sha256_file(partial / name) for name in files}}
            (partial / _CACHE_RECORD).write_text(json.dumps(record, indent=1, default=str))
            os.replace(partial, final)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
    return final / record["product"]


def _cached_product(folder: Path) -> Path | None:
    """The product inside a complete cache entry, or None (absent, or a file missing or truncated)."""
    try:
        record = json.loads((folder / _CACHE_RECORD).read_text())
    except (OSError, ValueError):
        return None
    for name, size in record["files"].items():
        if not (folder / name).is_file() or (folder / name).stat().st_size != size:
            return None
    return folder / record["product"]
