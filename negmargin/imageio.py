"""Decoding any common image file into a uint8 array.

Modes handled: RGB, L, LA, RGBA, P (with or without transparency), CMYK, YCbCr,
I;16 / I (16-bit), F (float), 1 (binary). EXIF orientation is applied. Images
with transparency are composited on white, so that transparent regions of a
logo or a cut-out look like paper rather than like black.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import DataError

IMAGE_EXTENSIONS = (
    ".jpg",
    ".jpeg",
    ".jpe",
    ".jfif",
    ".png",
    ".bmp",
    ".gif",
    ".tif",
    ".tiff",
    ".webp",
    ".ppm",
    ".pgm",
    ".pbm",
)


def is_image_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit and float images → 8-bit L by scaling, not clipping."""
    arr = np.asarray(img)
    if img.mode == "F":
        top = 1.0 if arr.size and float(np.nanmax(arr)) <= 1.0 else 255.0
        arr = np.clip(np.nan_to_num(arr) / top * 255.0, 0, 255)
    else:  # I;16*, I: 16-bit data stored as integers
        top = 65535.0 if arr.size and int(arr.max()) > 255 else 255.0
        arr = np.clip(arr.astype(np.float64) / top * 255.0, 0, 255)
    return Image.fromarray(np.round(arr).astype(np.uint8), mode="L")


def to_array(img: Image.Image, channels: int = 3) -> np.ndarray:
    """PIL image → (H, W, channels) uint8, EXIF-rotated, alpha composited on white."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        img = _to_8bit(img)
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    img = img.convert("RGB" if channels == 3 else "L")
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return np.ascontiguousarray(arr)


def read_image(source: str | Path | bytes, channels: int = 3, name: str | None = None) -> np.ndarray:
    """Decode a file path or encoded bytes to (H, W, channels) uint8.

    Raises :class:`DataError` naming the file if it cannot be decoded.
    """
    label = name or (str(source) if not isinstance(source, (bytes, bytearray)) else "<bytes>")
    try:
        handle = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(handle) as img:
                img.load()
                return to_array(img, channels)
    except FileNotFoundError:
        raise DataError(f"image file '{label}' does not exist") from None
    except UnidentifiedImageError:
        raise DataError(f"'{label}' is not an image file PIL can read") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"cannot decode image '{label}': {exc}") from None
