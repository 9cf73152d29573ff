"""The three stages of a restoration on Ray Data, each a ``map_batches`` callable:

- :func:`read_and_decode` (tasks): reads each input (and its reference) through fsspec and decodes it
  with its bit depth and channels; an unreadable, truncated or empty file becomes a ``skipped`` row
  with the reason;
- :class:`RestoreActor` (a pool of actors, one GPU each on a cluster): holds the restorer and the
  perceiver; restores the images of one size together through the evaluation's padding and tiling
  (``FullImageRestorer``), scores input and output, and rounds the output to the input's bit depth;
- :func:`encode_and_write` (tasks): encodes each output in its input's format, writes it atomically,
  then the batch's records (:mod:`.records`).

Pixels travel between the stages as raw bytes with their dtype and shape, so that images of any
size, bit depth and channel count share one block.
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np

from perceive_ir.data.images import ImageDecodeError, decode_rgb8
from perceive_ir.data.storage import filesystem, join, storage_error, write_bytes_atomic
from perceive_ir.workflows.restoration.codecs import Decoded, decode_pixels, encode_pixels, from_unit_rgb, to_unit_rgb
from perceive_ir.workflows.restoration.records import write_part

__all__ = ["read_and_decode", "RestoreActor", "encode_and_write", "folder_files"]

_NAN = float("nan")


def _pack(arr: np.ndarray) -> tuple[bytes, str, str]:
    return np.ascontiguousarray(arr).tobytes(), arr.dtype.str, "x".join(str(s) for s in arr.shape)


def _dims(shape: str) -> list[int]:
    return [int(s) for s in str(shape).split("x")]


def _unpack(data: bytes, dtype: str, shape: str) -> np.ndarray:
    return np.frombuffer(data, dtype=np.dtype(dtype)).reshape(_dims(shape))


def _present(value: Any) -> bool:
    """A value that came through Arrow: a column of nulls may come back as NaN."""
    return value is not None and not (isinstance(value, (float, np.floating)) and math.isnan(value))


def _columns(rows: list[dict[str, Any]], names: list[str]) -> dict[str, np.ndarray]:
    out = {}
    for name in names:
        values = [row.get(name) for row in rows]
        column = np.empty(len(values), dtype=object)
        column[:] = values
        out[name] = column
    return out


_CARRIED = ["path", "status", "reason", "format", "input_bytes", "pixels", "dtype", "shape", "icc", "exif",
            "target", "target_shape", "decode_s"]

# What the actor hands on: no input pixels, the output's instead
_RESTORED = [name for name in _CARRIED if name not in ("pixels", "target", "target_shape")] + [
    "out", "seconds", "quality_in", "quality_out", "psnr_in", "psnr_out", "ssim_in", "ssim_out"]


def _read(url: str, options: Mapping[str, Any]) -> bytes:
    fs, path = filesystem(url, options)
    try:
        with fs.open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise
    except Exception as err:  # noqa: BLE001 - any store error: one line naming the URL
        raise storage_error(url, err, "read") from None


def read_and_decode(batch: dict[str, np.ndarray], input: str, target: Optional[str],
                    options: Mapping[str, Any]) -> dict[str, np.ndarray]:
    rows = []
    for relative in batch["path"]:
        relative = str(relative)
        row: dict[str, Any] = {"path": relative, "status": "decoded", "reason": ""}
        start = time.perf_counter()
        try:
            data = _read(join(input, relative), options)
            row["input_bytes"] = len(data)
            decoded = decode_pixels(data, relative)
        except (ImageDecodeError, OSError) as err:
            row.update(status="skipped", reason=str(err))
            rows.append(row)
            continue
        row["pixels"], row["dtype"], row["shape"] = _pack(decoded.pixels)
        row.update(format=decoded.format, icc=decoded.info.get("icc_profile"), exif=decoded.info.get("exif"))
        if target:
            try:  # a reference of the same relative path, compared in 8-bit RGB (the evaluation's)
                reference, _ = decode_rgb8(_read(join(target, relative), options), relative)
                row["target"], _, row["target_shape"] = _pack(reference)
            except (ImageDecodeError, OSError) as err:
                row["reason"] = f"no reference: {err}"
        row["decode_s"] = time.perf_counter() - start
        rows.append(row)
    return _columns(rows, _CARRIED)


def folder_files(folder: Path) -> dict[str, bytes]:
    """A product folder's files (relative path -> bytes), to rebuild it inside an actor on any node."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _materialise(files: Mapping[str, bytes], folder: Path) -> Path:
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return folder


class RestoreActor:
    """Holds the restorer (and the perceiver); restores a batch of decoded rows."""

    def __init__(self, restorer: Mapping[str, bytes], perceiver: Optional[Mapping[str, bytes]],
                 inference: Mapping[str, Any], batch_pixels: int, threads: int) -> None:
        import torch

        from perceive_ir.eval.inference import FullImageRestorer, InferenceConfig
        from perceive_ir.products import load_perceiver, load_restorer

        torch.set_num_threads(max(1, threads))
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        with tempfile.TemporaryDirectory(prefix="restorer-") as folder:
            network, _ = load_restorer(_materialise(restorer, Path(folder)))
        self.restorer = FullImageRestorer(network.eval().to(self.device), InferenceConfig(**inference))
        self.perceiver = None
        if perceiver:
            with tempfile.TemporaryDirectory(prefix="perceiver-") as folder:
                self.perceiver = load_perceiver(_materialise(perceiver, Path(folder))).eval().to(self.device)
        self.batch_pixels = batch_pixels

    def _tensor(self, images: list[np.ndarray]):
        import torch

        return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).to(self.device)

    def _restore(self, images: list[np.ndarray]) -> list[np.ndarray]:
        restored = self.restorer(self._tensor(images)).permute(0, 2, 3, 1).float().cpu().numpy()
        return [r.astype(np.float32) for r in restored]

    def _quality(self, images: list[np.ndarray]) -> list[float]:
        if self.perceiver is None:
            return [_NAN] * len(images)
        return [float(q) for q in self.perceiver.quality_score(self._tensor(images)).double().cpu()]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        rows = [{name: batch[name][k] for name in batch} for k in range(len(batch["path"]))]
        groups: dict[tuple, list[int]] = {}
        for k, row in enumerate(rows):
            if row["status"] == "decoded":
                groups.setdefault(tuple(_dims(row["shape"])[:2]), []).append(k)
        with torch.no_grad():
            for (h, w), members in groups.items():
                per_pass = max(1, self.batch_pixels // max(1, h * w))
                for start in range(0, len(members), per_pass):
                    self._restore_group([rows[k] for k in members[start:start + per_pass]])
        return _columns(rows, _RESTORED)

    def _restore_group(self, rows: list[dict[str, Any]]) -> None:
        inputs = [_unpack(r["pixels"], r["dtype"], r["shape"]) for r in rows]
        unit = [to_unit_rgb(p) for p in inputs]
        start = time.perf_counter()
        restored = self._restore(unit)
        seconds = (time.perf_counter() - start) / len(rows)
        quality_in, quality_out = self._quality(unit), self._quality(restored)
        for row, pixels, before, after, q_in, q_out in zip(rows, inputs, unit, restored, quality_in, quality_out):
            row["out"] = _pack(from_unit_rgb(after, pixels))[0]
            row.update(status="restored", seconds=seconds, quality_in=q_in, quality_out=q_out)
            row.update(self._against_target(row, before, after))

    def _against_target(self, row: dict[str, Any], before: np.ndarray, after: np.ndarray) -> dict[str, float]:
        from perceive_ir.eval.metrics import psnr, ssim

        if not _present(row.get("target")):
            return {}
        reference = _unpack(row["target"], "|u1", row["target_shape"]).astype(np.float32) / 255
        if reference.shape != before.shape:
            row["reason"] = f"reference is {reference.shape[1]}x{reference.shape[0]}, the input {before.shape[1]}x{before.shape[0]}"
            return {}
        y, x, r = (self._tensor([a]).float().cpu() for a in (reference, before, after))
        return {"psnr_in": float(psnr(x, y)), "psnr_out": float(psnr(r, y)), "ssim_in": float(ssim(x, y)),
                "ssim_out": float(ssim(r, y))}


def _record(row: dict[str, Any], output_bytes: Optional[int]) -> dict[str, Any]:
    shape = _dims(row["shape"]) if _present(row.get("shape")) else [0, 0, 0]
    dtype = row.get("dtype")
    depth = {"|u1": "8", "<u2": "16", "<f4": "32f"}.get(dtype, "") if _present(dtype) else ""
    q_in, q_out = (float(row[k]) if _present(row.get(k)) else _NAN for k in ("quality_in", "quality_out"))
    record = {"path": row["path"], "status": row["status"], "reason": row["reason"] if _present(row.get("reason")) else "",
              "format": row["format"] if _present(row.get("format")) else "", "depth": depth, "channels": shape[2], "height": shape[0],
              "width": shape[1], "input_bytes": int(row["input_bytes"]) if _present(row.get("input_bytes")) else 0,
              "output_bytes": output_bytes, "seconds": float(row["seconds"]) if _present(row.get("seconds")) else _NAN,
              "quality_in": q_in, "quality_out": q_out,
              "flagged": bool(math.isfinite(q_in) and math.isfinite(q_out) and q_out < q_in),
              "finished_at": time.time()}
    for key in ("psnr_in", "psnr_out", "ssim_in", "ssim_out"):
        record[key] = float(row[key]) if _present(row.get(key)) else _NAN
    return record


def encode_and_write(batch: dict[str, np.ndarray], output: str, options: Mapping[str, Any],
                     jpeg_quality: int, webp_quality: int) -> dict[str, np.ndarray]:
    rows = [{name: batch[name][k] for name in batch} for k in range(len(batch["path"]))]
    records = []
    for row in rows:
        size = None
        if row["status"] == "restored":
            like = Decoded(np.empty(_dims(row["shape"]), dtype=np.dtype(row["dtype"])), row["format"],
                           {k: v for k, v in (("icc_profile", row.get("icc")), ("exif", row.get("exif")))
                            if _present(v) and v})
            pixels = _unpack(row["out"], row["dtype"], row["shape"])
            try:
                data = encode_pixels(like, pixels, jpeg_quality, webp_quality)
                fs, path = filesystem(join(output, row["path"]), options)
                write_bytes_atomic(fs, path, data)  # a temporary name, then a rename
                size = len(data)
            except Exception as err:  # noqa: BLE001 - one image that cannot be written never stops the job
                row.update(status="skipped", reason=f"cannot write the output: {type(err).__name__}: {err}")
        records.append(_record(row, size))
    write_part(output, records, options)
    return _columns(records, ["path", "status", "seconds"])
