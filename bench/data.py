"""Packed-cache speed: preparation rate and read rate, on CUB-like ~500×375 JPEGs.

    python bench/data.py [--images 1200] [--workers 0]

Generates JPEGs of about 500×375 (random sizes around it, as CUB's), then
  * prepares the train cache (decode + resize to short side 256) with all cores
    and with one, and prints images/s;
  * re-runs preparation on unchanged inputs (should do nothing) and prints its time;
  * reads random batches of 64 crops from the memory-mapped cache (what the training
    loader does) and prints images/s, next to decoding the same JPEGs with PIL.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from negmargin.augment import sample_params  # noqa: E402
from negmargin.config import Config  # noqa: E402
from negmargin.datasets import load_split, read_source, store_policy  # noqa: E402
from negmargin.datasets.cache import prepare  # noqa: E402
from negmargin.loader import cut_crops  # noqa: E402


def make(root: Path, n: int) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        h, w = int(rng.integers(330, 420)), int(rng.integers(450, 520))
        yy, xx = np.mgrid[0:h, 0:w] / w
        img = np.stack(
            [127 + 90 * np.sin(9 * xx * (c + 1) + 5 * yy + rng.uniform(0, 6)) for c in range(3)], -1
        )
        img = np.clip(img + rng.normal(0, 18, img.shape), 0, 255).astype(np.uint8)
        p = root / f"class{i % 20:02d}" / f"{i:05d}.jpg"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(p, quality=90)
        paths.append(p)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=1200)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="negmargin-data-"))
    paths = make(tmp / "jpegs", args.images)
    mb = sum(p.stat().st_size for p in paths) / 2**20
    print(f"{len(paths)} JPEGs, ~500×375, {mb:.0f} MiB")
    raw = {
        "data": {"dataset": "folder", "root": str(tmp / "jpegs"), "options": {"split_fractions": (1, 0, 0)}}
    }
    for workers in (0, 1):
        cfg = Config.from_dict(
            {
                **raw,
                "data": {
                    **raw["data"],
                    "cache_dir": str(tmp / f"cache{workers}"),
                    "prepare_workers": workers,
                },
            }
        ).validate()
        src = read_source(cfg, "train")
        t0 = time.perf_counter()
        prepare(src, store_policy(cfg, "train"), cfg.data.cache_dir, workers=workers, progress=False)
        dt = time.perf_counter() - t0
        label = "all cores" if workers == 0 else "1 process"
        print(
            f"prepare (decode + resize to short side 256), {label}: {len(src) / dt:.0f} images/s ({dt:.1f} s)"
        )
    t0 = time.perf_counter()
    packed = load_split(cfg, "train", progress=False, log=lambda m: None)
    print(f"prepare again, inputs unchanged: {time.perf_counter() - t0:.2f} s (listing check only)")
    stored = packed.buffer.nbytes / 2**20
    print(f"cache: {stored:.0f} MiB for {len(packed)} images at short side 256")

    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    n = 0
    while time.perf_counter() - t0 < 3:
        idx = rng.integers(0, len(packed), 64)
        p = sample_params(rng, packed.heights[idx], packed.widths[idx], cfg.augment)
        cut_crops([packed.image(int(i)) for i in idx], p.boxes)  # what the loader's threads do
        n += 64
    read_rate = n / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    m = 0
    while time.perf_counter() - t0 < 3:
        Image.open(paths[m % len(paths)]).convert("RGB").load()
        m += 1
    decode_rate = m / (time.perf_counter() - t0)
    print(f"read random crops from the cache (one thread): {read_rate:.0f} images/s")
    print(
        f"decode the JPEGs with PIL (one thread):        {decode_rate:.0f} images/s  "
        f"(cache read is {read_rate / decode_rate:.0f}× faster)"
    )


if __name__ == "__main__":
    main()
