"""What a restoration has done, kept beside its output: the inputs to do, per-image records, resumption.

Every batch the writer finishes leaves one Parquet part in ``<output>/_restore/records/`` (written
atomically: a temporary name, then a rename; an object store's put is atomic by itself), after the
images it lists are in place. An image is done when a record says it was restored and its output
file has the size that record wrote: an output that a killed job left behind without a record, or one
cut short by anything, is restored again. A record may be written twice (a retried task); the newest
one counts.
"""

from __future__ import annotations

import io
import posixpath
import uuid
from typing import Any, Mapping, Optional

from perceive_ir.data.images import IMAGE_EXTENSIONS
from perceive_ir.data.storage import filesystem, join, write_bytes_atomic
from perceive_ir.workflows.restoration.config import STATE_FOLDER

__all__ = ["RECORD_COLUMNS", "list_images", "records_folder", "write_part", "read_records", "done_paths",
           "output_sizes"]

# One row per image and launch that handled it: the report's columns
RECORD_COLUMNS = {
    "path": "string", "status": "string", "reason": "string", "format": "string", "depth": "string",
    "channels": "int64", "height": "int64", "width": "int64", "input_bytes": "int64", "output_bytes": "int64",
    "seconds": "float64", "quality_in": "float64", "quality_out": "float64", "flagged": "bool_",
    "psnr_in": "float64", "psnr_out": "float64", "ssim_in": "float64", "ssim_out": "float64", "finished_at": "float64",
}


def records_folder(output: str) -> str:
    return join(output, STATE_FOLDER, "records")


def _relative(root: str, path: str) -> str:
    return posixpath.relpath(path, root) if root else path


def list_images(root: str, options: Mapping[str, Any], skip: Optional[str] = None) -> dict[str, int]:
    """Every image file below ``root`` (recursively; by extension, any case) as ``relative path -> bytes``,
    sorted; without the job's own folders and, when the output lies inside the input, without ``skip``."""
    fs, base = filesystem(root, options)
    base = base.rstrip("/") if base not in ("/", "") else base
    if not fs.exists(base):
        raise FileNotFoundError(f"'{root}' does not exist")
    if fs.isfile(base):
        parent = posixpath.dirname(base)
        return {_relative(parent, base): int(fs.size(base) or 0)}
    skip_path = filesystem(skip, options)[1].rstrip("/") if skip else None
    found = {}
    for path, info in fs.find(base, detail=True).items():
        if info.get("type") == "directory" or not path.lower().endswith(IMAGE_EXTENSIONS):
            continue
        if skip_path and (path + "/").startswith(skip_path + "/"):
            continue
        relative = _relative(base, path)
        if STATE_FOLDER in relative.split("/"):
            continue
        found[relative] = int(info.get("size") or 0)
    return dict(sorted(found.items()))


def write_part(output: str, rows: list[dict[str, Any]], options: Mapping[str, Any]) -> str:
    """One atomic Parquet part of records; returns its URL."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([(name, getattr(pa, kind)()) for name, kind in RECORD_COLUMNS.items()])
    table = pa.Table.from_pylist([{k: row.get(k) for k in RECORD_COLUMNS} for row in rows], schema=schema)
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    url = join(records_folder(output), f"part-{uuid.uuid4().hex}.parquet")
    fs, path = filesystem(url, options)
    write_bytes_atomic(fs, path, buffer.getvalue())
    return url


def read_records(output: str, options: Mapping[str, Any]):
    """Every record under ``output`` as a pandas table, the newest per image (an empty table when none)."""
    import pandas as pd
    import pyarrow.parquet as pq

    fs, folder = filesystem(records_folder(output), options)
    parts = sorted(fs.glob(posixpath.join(folder, "part-*.parquet"))) if fs.exists(folder) else []
    tables = []
    for part in parts:
        with fs.open(part, "rb") as f:
            tables.append(pq.read_table(f).to_pandas())
    if not tables:
        return pd.DataFrame({name: pd.Series(dtype="object") for name in RECORD_COLUMNS})
    records = pd.concat(tables, ignore_index=True).sort_values("finished_at", kind="stable")
    return records.drop_duplicates("path", keep="last").sort_values("path").reset_index(drop=True)


def output_sizes(output: str, options: Mapping[str, Any]) -> dict[str, int]:
    """``relative path -> bytes`` of every file under ``output`` (one listing)."""
    fs, base = filesystem(output, options)
    base = base.rstrip("/")
    if not fs.exists(base):
        return {}
    return {_relative(base, path): int(info.get("size") or 0) for path, info in fs.find(base, detail=True).items()
            if info.get("type") != "directory"}


def done_paths(records, sizes: Mapping[str, int]) -> set[str]:
    """The images a record says were restored and whose output has the size it wrote."""
    if records.empty:
        return set()
    restored = records[records["status"] == "restored"]
    return {path for path, size in zip(restored["path"], restored["output_bytes"]) if sizes.get(path) == size}

