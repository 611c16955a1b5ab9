"""A built-in demo dataset, generated deterministically (no download).

120 classes of procedurally drawn pictures, 60 images each, split 72 / 18 / 30
(base / val / novel). A class is a recipe — a textured background (stripes,
checks or dots at a class-specific angle, frequency and palette) and one or two
filled shapes (a polygon with class-specific vertex radii, a star, a ring, a
cross or an ellipse) of class-specific colours and layout. Every image redraws
the recipe with its own rotation (±40°), scale (0.7–1.25), position, colour
shifts, stroke width, texture angle/frequency/phase, a random clutter shape
(half of the images) and pixel noise, so there is real within-class variation,
and novel classes share no recipe with base classes.

Written as ``<root>/<class>/<i>.png`` plus ``train.txt``, ``val.txt``,
``test.txt``; read with the folder reader.
"""

from __future__ import annotations

import math
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..errors import DataError
from ..fileio import atomic_write_text
from ..runlog import progress_bar
from .folder import read_folder

N_CLASSES = 120
N_IMAGES = 60
SPLIT_SIZES = (72, 18, 30)
IMAGE_SIZE = 48
VERSION = "demo-v2"


def _recipe(rng: np.random.Generator) -> dict:
    return {
        "bg": rng.integers(0, 256, 3),
        "bg2": rng.integers(0, 256, 3),
        "texture": int(rng.integers(0, 3)),
        "angle": rng.uniform(0, math.pi),
        "freq": rng.uniform(0.08, 0.35),
        "shape": int(rng.integers(0, 5)),
        "vertices": int(rng.integers(3, 8)),
        "radii": rng.uniform(0.55, 1.0, 8),
        "fg": rng.integers(0, 256, 3),
        "rotation": rng.uniform(0, 360),
        "size": rng.uniform(0.22, 0.36),
        "second": bool(rng.random() < 0.6),
        "shape2": int(rng.integers(0, 5)),
        "fg2": rng.integers(0, 256, 3),
        "offset2": rng.uniform(-0.28, 0.28, 2),
        "size2": rng.uniform(0.08, 0.16),
    }


def _shape_points(kind: int, cx: float, cy: float, r: float, rot: float, recipe: dict) -> list:
    if kind in (0, 1):  # polygon with class-specific radii / star
        n = recipe["vertices"] if kind == 0 else 2 * recipe["vertices"]
        pts = []
        for k in range(n):
            rad = r * (recipe["radii"][k % 8] if kind == 0 else (1.0 if k % 2 == 0 else 0.45))
            a = math.radians(rot) + 2 * math.pi * k / n
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        return pts
    return []


def _draw_shape(draw: ImageDraw.ImageDraw, kind: int, cx, cy, r, rot, color, width, recipe) -> None:
    color = tuple(int(c) for c in color)
    if kind in (0, 1):
        draw.polygon(_shape_points(kind, cx, cy, r, rot, recipe), fill=color)
    elif kind == 2:  # ring
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=color, width=max(2, int(width * 2.5)))
    elif kind == 3:  # cross
        a = math.radians(rot)
        for da in (0, math.pi / 2):
            dx, dy = r * math.cos(a + da), r * math.sin(a + da)
            draw.line([cx - dx, cy - dy, cx + dx, cy + dy], fill=color, width=max(2, int(width * 3)))
    else:  # ellipse, elongated along a class angle
        draw.ellipse([cx - r, cy - 0.55 * r, cx + r, cy + 0.55 * r], fill=color)


def draw_image(recipe: dict, rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """One instance of a class recipe: (size, size, 3) uint8."""
    big = size * 3  # drawn large, then reduced: smooth edges
    yy, xx = np.mgrid[0:big, 0:big].astype(np.float64) / 3
    a = recipe["angle"] + rng.normal(0, 0.2)
    f = recipe["freq"] * rng.uniform(0.75, 1.3)
    phase = rng.uniform(0, 2 * math.pi)
    u = xx * math.cos(a) + yy * math.sin(a)
    v = -xx * math.sin(a) + yy * math.cos(a)
    if recipe["texture"] == 0:
        t = 0.5 + 0.5 * np.sin(2 * math.pi * f * u + phase)
    elif recipe["texture"] == 1:
        t = ((np.floor(f * u + phase) + np.floor(f * v)) % 2).astype(np.float64)
    else:
        t = (np.sin(2 * math.pi * f * u + phase) * np.sin(2 * math.pi * f * v) > 0.35).astype(np.float64)
    shift = rng.normal(0, 30, 3)
    bg = np.clip(recipe["bg"] + shift + rng.normal(0, 15, 3), 0, 255)
    bg2 = np.clip(recipe["bg2"] + shift + rng.normal(0, 15, 3), 0, 255)
    if rng.random() < 0.3:
        bg, bg2 = bg2, bg
    canvas = bg[None, None] * (1 - t[..., None]) + bg2[None, None] * t[..., None]
    img = Image.fromarray(canvas.astype(np.uint8))
    draw = ImageDraw.Draw(img)
    if rng.random() < 0.5:  # clutter: a random shape of a random colour somewhere
        kind = int(rng.integers(0, 5))
        x0, y0 = rng.uniform(0.1, 0.9, 2) * big
        _draw_shape(
            draw,
            kind,
            x0,
            y0,
            big * rng.uniform(0.06, 0.14),
            rng.uniform(0, 360),
            rng.integers(0, 256, 3),
            2.0,
            _recipe(rng),
        )
    scale = rng.uniform(0.7, 1.25)
    cx, cy = big / 2 + rng.normal(0, big * 0.07, 2)
    rot = recipe["rotation"] + rng.uniform(-40, 40)
    width = rng.uniform(1.5, 3.5)
    fg = np.clip(recipe["fg"] + rng.normal(0, 30, 3), 0, 255)
    _draw_shape(draw, recipe["shape"], cx, cy, big * recipe["size"] * scale, rot, fg, width, recipe)
    if recipe["second"]:
        off = np.array(recipe["offset2"]) * big
        c, s = (
            math.cos(math.radians(rot - recipe["rotation"])),
            math.sin(math.radians(rot - recipe["rotation"])),
        )
        ox, oy = c * off[0] - s * off[1], s * off[0] + c * off[1]
        fg2 = np.clip(recipe["fg2"] + rng.normal(0, 30, 3), 0, 255)
        _draw_shape(
            draw, recipe["shape2"], cx + ox, cy + oy, big * recipe["size2"] * scale, rot, fg2, width, recipe
        )
    small = np.asarray(img.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float64)
    small += rng.normal(0, 10, small.shape)
    return np.clip(small, 0, 255).astype(np.uint8)


def generate(
    root: str | Path,
    n_classes: int = N_CLASSES,
    n_images: int = N_IMAGES,
    split_sizes: tuple[int, int, int] = SPLIT_SIZES,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Write the demo dataset under ``root`` (skipped if a complete copy is there).

    The demo writes only into a folder it made: a new or empty ``root``, or one that holds
    its ``DEMO_VERSION`` stamp (written first, so a generation cut short is still its own).
    Any other folder — a user's photos, say — is refused unchanged.
    """
    root = Path(root)
    stamp = root / "DEMO_VERSION"
    version = f"{VERSION} {n_classes} {n_images} {split_sizes} {seed}"
    if stamp.is_file() and stamp.read_text().strip() == version:
        return root
    if sum(split_sizes) != n_classes:
        raise ValueError("split sizes must add up to the number of classes")
    if root.exists() and not stamp.is_file() and (not root.is_dir() or any(root.iterdir())):
        raise DataError(
            f"'{root}' is not empty and was not made by the demo: the demo dataset writes its "
            "generated pictures only into a new or empty folder; for your own images use "
            "data.dataset='folder' (or another reader), or give the demo another data.root"
        )
    print(
        f"demo data: generating {n_classes} classes × {n_images} synthetic pictures in '{root}' "
        "(the built-in demo dataset, not real photos)",
        file=sys.stderr,
    )
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(stamp, f"generating {version}\n")
    names = [f"class_{c:03d}" for c in range(n_classes)]
    for c in progress_bar(range(n_classes), desc="generate demo data", enabled=progress, unit="class"):
        recipe = _recipe(np.random.default_rng([seed, c]))
        folder = root / names[c]
        folder.mkdir(exist_ok=True)
        rng = np.random.default_rng([seed, c, 1])
        for i in range(n_images):
            Image.fromarray(draw_image(recipe, rng)).save(folder / f"{i:03d}.png", optimize=False)
    order = np.random.default_rng([seed, 99]).permutation(n_classes)
    a, b = split_sizes[0], split_sizes[0] + split_sizes[1]
    for split, idx in (("train", order[:a]), ("val", order[a:b]), ("test", order[b:])):
        atomic_write_text(root / f"{split}.txt", "\n".join(sorted(names[i] for i in idx)) + "\n")
    atomic_write_text(stamp, version + "\n")
    return root


def read_demo(
    root: str | Path,
    split: str,
    n_classes: int = N_CLASSES,
    n_images: int = N_IMAGES,
    split_sizes: tuple[int, int, int] = SPLIT_SIZES,
    seed: int = 0,
):
    """Generate the demo data if needed (``data.options`` may shrink it), then read it as a
    folder dataset."""
    if sum(split_sizes) != n_classes or min(split_sizes) < 1:
        raise DataError(
            f"demo: data.options.split_sizes {split_sizes} must be positive and add up to "
            f"n_classes={n_classes}"
        )
    a, b, c = split_sizes
    generate(root, n_classes, n_images, (a, b, c), seed)
    source = read_folder(root, split)
    return replace(
        source, dataset="demo", layout=f"the built-in demo data (synthetic pictures): {source.layout}"
    )
