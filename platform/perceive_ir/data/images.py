"""Image decoding with one documented rule for every pixel format, and encoding for shards.

Conversion rule (applied by the shard builder, so that every sample in a shard is 8-bit RGB):
- 8-bit RGB is kept as is;
- grey (L, 1, I, F) is replicated to three channels;
- 16-bit images (I;16*, or 32-bit integer data above 255) are scaled to 8 bits
  with ``round(v / 257)`` (65535 -> 255);
- images with alpha (RGBA, LA, PA, palette with transparency) are composited over white,
  which is how a viewer shows them;
- CMYK and YCbCr go through Pillow's conversion to RGB (embedded ICC profiles are ignored).
"""

from __future__ import annotations

import hashlib
import io
import warnings

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
# Formats the training loader decodes directly (torchvision); others are re-encoded as PNG.
LOADER_FORMATS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}
# Extensions of image members inside shards (``gt.png``, ``lq.jpg``...).
SHARD_IMAGE_SUFFIXES = ("png", "jpg", "jpeg", "webp")

Image.MAX_IMAGE_PIXELS = 1 << 30  # large photos are legitimate; decompression bombs are far beyond


class ImageDecodeError(ValueError):
    """An image file is corrupt, truncated or not an image."""


def _to_rgb8(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode == "RGB":
        return np.asarray(img, dtype=np.uint8)
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(img)
        if arr.dtype.kind == "f":
            arr = np.clip(arr, 0.0, 1.0 if arr.max() <= 1.0 else 255.0)
            scale = 255.0 if arr.max() <= 1.0 else 1.0
            arr = np.rint(arr * scale)
        elif mode.startswith("I;16") or arr.max() > 255:
            arr = np.rint(arr.astype(np.float64) / 257.0)
        grey = np.clip(arr, 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        mode == "P" and "transparency" in img.info
    )
    if has_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"), dtype=np.uint8)
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def decode_rgb8(data: bytes, name: str = "<bytes>") -> tuple[np.ndarray, str | None]:
    """Decode any supported file into an H x W x 3 uint8 array.

    Returns the array and the file's format (``"PNG"``, ``"JPEG"``...). The whole image is
    decoded, so truncation anywhere in the file is caught here.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            fmt = img.format
            img.load()
            is_native_rgb8 = img.mode == "RGB"
            arr = _to_rgb8(img)
    except Exception as err:  # Pillow raises OSError, SyntaxError, ValueError... for bad files
        raise ImageDecodeError(f"{name}: {type(err).__name__}: {err}") from None
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.size == 0:
        raise ImageDecodeError(f"{name}: decoded to unexpected shape {arr.shape}")
    return np.ascontiguousarray(arr), (fmt if is_native_rgb8 else None)


def encode(arr: np.ndarray, fmt: str, quality: int = 95) -> bytes:
    """Encode an RGB8 array as ``png``, ``jpeg`` or ``webp``."""
    buf = io.BytesIO()
    img = Image.fromarray(arr, "RGB")
    if fmt == "png":
        img.save(buf, format="PNG", compress_level=1)  # fast to write and to inflate
    elif fmt in ("jpeg", "jpg"):
        img.save(buf, format="JPEG", quality=quality, subsampling=0 if quality >= 90 else 2)
    elif fmt == "webp":
        img.save(buf, format="WEBP", quality=quality, method=4)
    else:
        raise ValueError(f"unknown encoding '{fmt}' (expected png, jpeg or webp)")
    return buf.getvalue()


def pixel_hash(*arrays: np.ndarray) -> str:
    """sha256 over the decoded pixels and shapes: equal images hash equal whatever their file format."""
    h = hashlib.sha256()
    for arr in arrays:
        h.update(repr(arr.shape).encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()
