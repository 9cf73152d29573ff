"""Decoding and encoding for restoration: every pixel keeps its format, channels and bit depth.

The shard builder turns every image into 8-bit RGB (``perceive_ir.data.images``); a restored image
goes back to its owner in the form it came in instead:

- 8-bit and 16-bit PNG and TIFF (grey, grey + alpha, RGB, RGBA), 32-bit float TIFF, JPEG, BMP, WebP;
- grey stays grey (the mean of the restored channels), an alpha channel is carried over unchanged;
- palette, CMYK, YCbCr and 1-bit images follow the shard builder's conversion to RGB (or RGBA where
  the palette has transparency) and are written back as such;
- the ICC profile (and a JPEG's EXIF block) of the input is written into the output.

16-bit RGB PNG is decoded by torchvision (Pillow truncates it to 8 bits) and written by
:func:`png16_bytes`; TIFF above 8 bits or in float goes through ``tifffile``.
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from perceive_ir.data.images import ImageDecodeError

__all__ = ["Decoded", "decode_pixels", "encode_pixels", "to_unit_rgb", "from_unit_rgb", "png16_bytes",
           "OUTPUT_FORMATS"]

# Pillow's format name -> what an output in that format is written as
OUTPUT_FORMATS = {"PNG": "PNG", "TIFF": "TIFF", "JPEG": "JPEG", "MPO": "JPEG", "BMP": "BMP", "WEBP": "WEBP"}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*")


@dataclass
class Decoded:
    """An image as its file holds it: ``pixels`` H x W x C (C = 1 grey, 2 grey + alpha, 3 RGB, 4 RGBA),
    uint8, uint16 or float32 (TIFF only), and what its output file needs."""

    pixels: np.ndarray
    format: str  # PNG, TIFF, JPEG, BMP, WEBP
    info: dict = field(default_factory=dict)  # icc_profile, exif (bytes)

    @property
    def depth(self) -> str:
        return {np.dtype(np.uint8): "8", np.dtype(np.uint16): "16"}.get(self.pixels.dtype, "32f")


def _png_header(data: bytes) -> tuple[int, int]:
    """(bit depth, colour type) from a PNG's IHDR."""
    return data[24], data[25]


def _tiff_pixels(data: bytes) -> np.ndarray:
    import tifffile

    arr = tifffile.imread(io.BytesIO(data))
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim == 3 and arr.shape[0] in (1, 2, 3, 4) and arr.shape[-1] not in (1, 2, 3, 4):
        arr = np.moveaxis(arr, 0, -1)  # planar configuration
    if arr.dtype.kind == "f":
        return arr.astype(np.float32)
    if arr.dtype in (np.uint8, np.uint16):
        return arr
    raise ValueError(f"TIFF samples of type {arr.dtype} are not supported (uint8, uint16, float)")


def _tiff_is_wide(img: Image.Image) -> bool:
    """Whether a TIFF holds samples of more than 8 bits or floats (Pillow would narrow them)."""
    tags = getattr(img, "tag_v2", {})
    bits = tags.get(258, (8,))
    bits = bits if isinstance(bits, tuple) else (bits,)
    return max(bits) > 8 or tags.get(339, 1) == 3  # SampleFormat 3: IEEE float


def _pillow_pixels(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode in ("RGB", "RGBA", "L", "LA"):
        arr = np.asarray(img)
    elif mode.startswith("I;16"):
        arr = np.asarray(img).astype(np.uint16)
    elif mode == "I":  # 32-bit integer grey: 16-bit PNG grey opens this way
        arr = np.asarray(img)
        arr = np.clip(arr, 0, 65535).astype(np.uint16) if arr.max() > 255 or img.format == "PNG" else arr.astype(np.uint8)
    elif mode == "F":
        arr = np.asarray(img, dtype=np.float32)
    elif mode in ("PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info):
        arr = np.asarray(img.convert("RGBA"))
    else:  # P, 1, CMYK, YCbCr, ...: the shard builder's conversion
        arr = np.asarray(img.convert("RGB"))
    return arr if arr.ndim == 3 else arr[..., None]


def decode_pixels(data: bytes, name: str = "<bytes>") -> Decoded:
    """Decode a whole file (so truncation anywhere is caught); :class:`ImageDecodeError` naming ``name``
    and the reason for an empty, truncated, corrupt or unsupported file."""
    if not data:
        raise ImageDecodeError(f"{name}: empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            if data[:4] in _TIFF_MAGIC and not _pillow_reads_tiff(data):  # float RGB TIFF, for one
                return _checked(Decoded(_tiff_pixels(data), "TIFF", {}), name)
            img = Image.open(io.BytesIO(data))
            fmt = OUTPUT_FORMATS.get(img.format or "")
            if fmt is None:
                raise ValueError(f"format {img.format} is not one restoration writes")
            info = {k: img.info[k] for k in ("icc_profile", "exif") if img.info.get(k)}
            if fmt == "TIFF" and _tiff_is_wide(img):
                pixels = _tiff_pixels(data)
            elif fmt == "PNG" and _png_header(data) in ((16, 2), (16, 6)):  # 16-bit RGB(A)
                img.load()  # Pillow's 8-bit reading checks the whole stream (truncation, CRCs)
                pixels = _png16_pixels(data)
            else:
                img.load()
                pixels = _pillow_pixels(img)
    except ImageDecodeError:
        raise
    except Exception as err:  # Pillow, tifffile and torchvision raise many kinds for a bad file
        raise ImageDecodeError(f"{name}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None
    return _checked(Decoded(pixels, fmt, info), name)


def _checked(decoded: Decoded, name: str) -> Decoded:
    pixels = decoded.pixels
    if pixels.ndim != 3 or pixels.shape[-1] not in (1, 2, 3, 4) or pixels.size == 0:
        raise ImageDecodeError(f"{name}: decoded to unexpected shape {pixels.shape}")
    decoded.pixels = np.ascontiguousarray(pixels)
    return decoded


def _pillow_reads_tiff(data: bytes) -> bool:
    try:
        Image.open(io.BytesIO(data))
        return True
    except Exception:  # noqa: BLE001 - any failure: tifffile gets its turn
        return False


def _png16_pixels(data: bytes) -> np.ndarray:
    import torch
    from torchvision.io import ImageReadMode, decode_png

    decoded = decode_png(torch.frombuffer(bytearray(data), dtype=torch.uint8), ImageReadMode.UNCHANGED)
    return decoded.permute(1, 2, 0).numpy().astype(np.uint16)


def _scale(dtype: np.dtype) -> float:
    return {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}.get(np.dtype(dtype), 1.0)


def to_unit_rgb(pixels: np.ndarray) -> np.ndarray:
    """H x W x C pixels -> H x W x 3 float32 in [0, 1] (grey replicated, alpha left out)."""
    rgb = pixels[..., :3] if pixels.shape[-1] >= 3 else np.repeat(pixels[..., :1], 3, axis=-1)
    unit = rgb.astype(np.float32) / np.float32(_scale(pixels.dtype))
    return np.clip(unit, 0.0, 1.0) if pixels.dtype.kind == "f" else unit


def from_unit_rgb(restored: np.ndarray, like: np.ndarray) -> np.ndarray:
    """A restored H x W x 3 float image in [0, 1] back to the layout and type of the input ``like``:
    grey again (the channels' mean), its alpha channel carried over, rounded to its bit depth."""
    channels = like.shape[-1]
    colour = restored.mean(axis=-1, keepdims=True) if channels in (1, 2) else restored
    scale = _scale(like.dtype)
    if like.dtype.kind != "f":
        colour = np.rint(np.clip(colour, 0.0, 1.0) * scale).astype(like.dtype)
    else:
        colour = colour.astype(np.float32)
    if channels in (2, 4):
        colour = np.concatenate([colour, like[..., -1:]], axis=-1)
    return np.ascontiguousarray(colour)


def png16_bytes(pixels: np.ndarray) -> bytes:
    """A 16-bit PNG (grey, grey + alpha, RGB or RGBA) from H x W x C uint16 pixels."""
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[pixels.shape[-1]]
    h, w = pixels.shape[:2]
    rows = np.zeros((h, 1 + w * pixels.shape[-1] * 2), dtype=np.uint8)  # filter byte 0 per row
    rows[:, 1:] = pixels.astype(">u2").reshape(h, -1).view(np.uint8)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)
    return (_PNG_SIGNATURE + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows.tobytes(), 6))
            + chunk(b"IEND", b""))


def _tiff_bytes(pixels: np.ndarray, info: dict) -> bytes:
    import tifffile

    buf = io.BytesIO()
    photometric = "rgb" if pixels.shape[-1] >= 3 else "minisblack"
    extra = {"extrasamples": [2]} if pixels.shape[-1] in (2, 4) else {}  # 2: unassociated alpha
    tags = [(34675, 7, None, info["icc_profile"], False)] if info.get("icc_profile") else []
    data = pixels[..., 0] if pixels.shape[-1] == 1 else pixels
    tifffile.imwrite(buf, data, photometric=photometric, compression="zlib", extratags=tags, **extra)
    return buf.getvalue()


def encode_pixels(decoded: Decoded, pixels: np.ndarray, jpeg_quality: int = 95, webp_quality: int = 95) -> bytes:
    """The output file of ``pixels`` (the layout of ``decoded.pixels``) in the input's format."""
    fmt, info = decoded.format, decoded.info
    if fmt == "TIFF":
        return _tiff_bytes(pixels, info)
    if pixels.dtype == np.uint16:
        if fmt != "PNG":
            raise ValueError(f"16-bit pixels cannot be written as {fmt}")
        return png16_bytes(pixels)
    if pixels.dtype != np.uint8:
        raise ValueError(f"{pixels.dtype} pixels can only be written as TIFF, not {fmt}")
    mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[pixels.shape[-1]]
    img = Image.fromarray(pixels[..., 0] if mode == "L" else pixels, mode)
    options: dict = {"icc_profile": info["icc_profile"]} if info.get("icc_profile") else {}
    if fmt == "JPEG":
        if mode in ("LA", "RGBA"):
            img = img.convert(mode[:-1])
        options.update(quality=jpeg_quality, subsampling=0 if jpeg_quality >= 90 else 2)
        if info.get("exif"):
            options["exif"] = info["exif"]
    elif fmt == "WEBP":
        options.update(quality=webp_quality, method=4)
    elif fmt == "PNG":
        options.update(compress_level=6)
    elif fmt == "BMP" and mode == "LA":
        img = img.convert("RGBA")
    buf = io.BytesIO()
    img.save(buf, format=fmt, **options)
    return buf.getvalue()
