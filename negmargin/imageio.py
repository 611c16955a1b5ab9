"""Images on disk and in memory: which files are images, where they are found, and how
any image becomes a uint8 array.

One rule for what counts as an image file (:data:`IMAGE_EXTENSIONS`, hidden files
and folders left out) and one function that finds them (:func:`list_images`), for
the dataset readers and for a user's support and query folders alike.

Modes handled: RGB, L, LA, RGBA, P (with or without transparency), CMYK, YCbCr,
I;16 / I (16-bit), F (float), 1 (binary). EXIF orientation is applied. Images
with transparency are composited on white, so that transparent regions of a
logo or a cut-out look like paper rather than like black.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

from .errors import DataError

ImageLike = str | Path | Image.Image | Tensor | np.ndarray

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


@contextlib.contextmanager
def open_image(source: str | Path | bytes, name: str | None = None) -> Iterator[Image.Image]:
    """A file path or encoded bytes opened by PIL (pixels not decoded yet); any failure in the
    block, opening or decoding, becomes a :class:`DataError` naming the file (``name`` if given)."""
    label = name or (str(source) if not isinstance(source, (bytes, bytearray)) else "<bytes>")
    try:
        handle = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(handle) as img:
                yield img
    except FileNotFoundError:
        raise DataError(f"image file '{label}' does not exist") from None
    except UnidentifiedImageError:
        raise DataError(f"'{label}' is not an image file PIL can read") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"cannot decode image '{label}': {exc}") from None


def read_image(source: str | Path | bytes, channels: int = 3, name: str | None = None) -> np.ndarray:
    """Decode a file path or encoded bytes to (H, W, channels) uint8.

    Raises :class:`DataError` naming the file if it cannot be decoded.
    """
    with open_image(source, name) as img:
        img.load()
        return to_array(img, channels)


def read_size(source: str | Path | bytes) -> tuple[int, int]:
    """(height, width) of an image file or encoded bytes, read from its header without decoding
    the pixels (EXIF orientation not applied: callers need the area). DataError if unreadable."""
    with open_image(source) as img:
        width, height = img.size
        return height, width


def as_uint8(image: ImageLike, channels: int = 3, name: str = "image") -> np.ndarray:
    """Any image the API takes → (H, W, channels) uint8.

    A path is decoded (:func:`read_image`); a PIL image converted (:func:`to_array`);
    a tensor or array of shape (H, W, C), (C, H, W) or (H, W), uint8 or float in
    [0, 1] or [0, 255], is scaled to 8 bits. ``name`` is how an error refers to it.
    """
    if isinstance(image, (str, Path)):
        return read_image(Path(image), channels)
    if isinstance(image, Image.Image):
        return to_array(image, channels)
    if not isinstance(image, (Tensor, np.ndarray)):
        raise DataError(
            f"{name}: expected a file path, a PIL image, a tensor or an array, got {type(image).__name__}"
        )
    arr = image.detach().cpu().numpy() if isinstance(image, Tensor) else np.asarray(image)
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = arr.transpose(1, 2, 0)  # (C, H, W) → (H, W, C)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3:
        raise DataError(f"{name}: expected an image array of shape (H, W, C) or (C, H, W), got {arr.shape}")
    if arr.dtype != np.uint8:
        top = 1.0 if float(arr.max(initial=0)) <= 1.0 else 255.0  # floats in [0, 1] or [0, 255]
        arr = np.clip(np.round(arr.astype(np.float64) / top * 255), 0, 255).astype(np.uint8)
    if arr.shape[2] != channels:
        arr = to_array(Image.fromarray(arr.squeeze(-1) if arr.shape[2] == 1 else arr), channels)
    return arr


@dataclass
class Skipped:
    """Files left out, by reason, for the one-line report."""

    reasons: dict[str, list[str]] = field(default_factory=dict)

    def add(self, reason: str, name: str) -> None:
        self.reasons.setdefault(reason, []).append(name)

    def __len__(self) -> int:
        return sum(len(v) for v in self.reasons.values())

    def line(self, where: str) -> str | None:
        if not self.reasons:
            return None
        parts = []
        for reason, names in self.reasons.items():
            shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            parts.append(f"{len(names)} {reason} ({shown})")
        return f"skipped in {where}: " + "; ".join(parts)


def list_images(folder: Path, recursive: bool = False, skipped: Skipped | None = None) -> list[Path]:
    """The image files in ``folder`` (with ``recursive``, in its sub-folders too), sorted.

    What counts as an image, everywhere: a file whose extension is one of
    :data:`IMAGE_EXTENSIONS` (any case). Hidden files and folders (``.DS_Store``,
    ``.ipynb_checkpoints``) and files with other extensions are left out and, when
    ``skipped`` is given, recorded in it. A file a user names explicitly (not found
    in a folder) is always decoded, whatever its extension.
    """
    out = []
    for f in sorted(folder.rglob("*") if recursive else folder.iterdir()):
        rel = f.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts):
            if f.is_file() and skipped is not None:
                skipped.add("hidden file(s)", str(f))
        elif f.is_file():
            if is_image_file(f):
                out.append(f)
            elif skipped is not None:
                skipped.add("file(s) without an image extension", str(f))
    return out


@dataclass
class SupportSet:
    paths: list[Path]
    labels: list[str]
    folder: Path
    nested: int  # images found in sub-folders of a class folder
    skipped: Skipped

    def line(self) -> str:
        counts = Counter(self.labels)
        text = (
            f"support: {len(counts)} classes, {len(self.paths)} images "
            f"({', '.join(f'{c} {n}' for c, n in counts.items())})"
        )
        if self.nested:
            text += f"; {self.nested} of them in sub-folders of a class folder"
        return text


def read_support_folder(folder: str | Path) -> SupportSet:
    """``folder/<class>/**`` → the support set; clear errors for empty or odd folders.

    A class is a top-level sub-folder; its images are every image file under it,
    sub-folders included (the same rule as for query folders: :func:`list_images`).
    A file that is not an image is an error here, not a skip: the support set
    defines the classes, and a stray file in it is a mistake to fix.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(
            f"support folder '{folder}' does not exist; it should hold one sub-folder "
            "of labelled images per class"
        )
    classes = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise DataError(
            f"support folder '{folder}' has {len(classes)} class folder(s); few-shot prediction "
            "needs at least 2 (one sub-folder of images per class)"
        )
    paths, labels, nested, skipped = [], [], 0, Skipped()
    for c in classes:
        mine = Skipped()
        files = list_images(c, recursive=True, skipped=mine)
        strays = mine.reasons.get("file(s) without an image extension", [])
        if strays:
            raise DataError(
                f"'{strays[0]}' in the support set is not an image file; remove it or move it out"
            )
        for reason, names in mine.reasons.items():
            for name in names:
                skipped.add(reason, name)
        if not files:
            raise DataError(f"class folder '{c}' is empty; add at least one image or remove the folder")
        nested += sum(f.parent != c for f in files)
        paths += files
        labels += [c.name] * len(files)
    return SupportSet(paths, labels, folder, nested, skipped)


def collect_query_paths(items: Sequence[str | Path], what: str = "query") -> tuple[list[Path], Skipped]:
    """Files as given; folders expanded (recursively, :func:`list_images`) to their image files."""
    out: list[Path] = []
    skipped = Skipped()
    for item in items:
        p = Path(item)
        if p.is_dir():
            out += list_images(p, recursive=True, skipped=skipped)
        elif p.is_file():
            out.append(p)
        else:
            raise DataError(f"{what} '{p}' does not exist")
    if not out:
        raise DataError(
            f"no {what} images found in {', '.join(map(str, items))}"
            + (f" ({skipped.line('the query folders')})" if len(skipped) else "")
        )
    return out, skipped
