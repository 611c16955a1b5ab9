"""The train augmentation: ours against kornia's, per batch of 64 at 84×84.

    pip install kornia            # optional; only this benchmark uses it
    python bench/augment_libs.py [--batches 30] [--device cpu]

Why the question matters: the issue asked for a well-kept library (kornia) if it
is as fast. Both sides start from the same packed-cache images (uint8, short side
256, long side ~330–350, as CUB's train cache) and end with a normalised
(64, 3, 84, 84) float batch after RandomResizedCrop(84, scale 0.08–1, ratio
3/4–4/3) + horizontal flip + ColorJitter(0.4, 0.4, 0.4):

  * ours: per-sample parameters drawn in NumPy, each crop cut from its image (what
    the loader thread does), then :func:`negmargin.augment.train_batch`;
  * kornia: ``AugmentationSequential(RandomResizedCrop, RandomHorizontalFlip,
    ColorJitter)`` on a float batch. kornia needs one tensor of equal-sized images,
    so the images are first padded into a (64, 3, 256, 350) batch — kornia then
    also samples crops inside the padding, so this is its best case for speed, not
    the reference's distribution (which draws each crop from its own image size).

Prints ms per batch for each and the ratio, measured in one run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from negmargin.augment import normalize, sample_params, train_batch  # noqa: E402
from negmargin.config import Config  # noqa: E402
from negmargin.loader import cut_crops  # noqa: E402

MEAN, STD = Config().data.mean, Config().data.std


def images(n: int, rng: np.random.Generator) -> list[np.ndarray]:
    out = []
    for _ in range(n):
        w = int(rng.integers(330, 351))
        out.append(rng.integers(0, 256, (256, w, 3), dtype=np.uint8))
    return out


def ours(
    batch: list[np.ndarray], rng: np.random.Generator, cfg: Config, device: torch.device
) -> torch.Tensor:
    heights = np.array([im.shape[0] for im in batch])
    widths = np.array([im.shape[1] for im in batch])
    params = sample_params(rng, heights, widths, cfg.augment)
    buf = cut_crops(batch, params.boxes)  # what the loader's threads do
    hw = torch.from_numpy(params.boxes[:, 2:])
    return train_batch(buf.to(device), hw.to(device), params, cfg.augment, 84, MEAN, STD)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", type=int, default=30)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    try:
        import kornia.augmentation as K
    except ImportError:
        print("kornia is not installed (pip install kornia); nothing to compare")
        return
    device = torch.device(args.device)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    cfg = Config()
    pool = images(256, rng)
    # kornia's ColorJitter is torchvision's (random order of the ops per sample).
    aug = K.AugmentationSequential(
        K.RandomResizedCrop((84, 84), scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)),
        K.RandomHorizontalFlip(p=0.5),
        K.ColorJitter(0.4, 0.4, 0.4, p=1.0),
    ).to(device)

    def kornia_batch(batch: list[np.ndarray]) -> torch.Tensor:
        padded = np.zeros((len(batch), 256, 350, 3), np.uint8)
        for b, im in enumerate(batch):
            padded[b, :, : im.shape[1]] = im
        x = torch.from_numpy(padded).to(device).permute(0, 3, 1, 2).float().div_(255)
        return normalize(aug(x).mul_(255), MEAN, STD)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    results = {}
    for name, fn in (("ours", lambda b: ours(b, rng, cfg, device)), ("kornia", kornia_batch)):
        for i in range(3):  # warm-up
            fn(pool[i * 64 : (i + 1) * 64])
        sync()
        t0 = time.perf_counter()
        for i in range(args.batches):
            start = (i * 64) % (len(pool) - 64)
            out = fn(pool[start : start + 64])
        sync()
        results[name] = (time.perf_counter() - t0) / args.batches * 1000
        assert out.shape == (64, 3, 84, 84)
    print(f"device {device}, torch threads {torch.get_num_threads()}, batch 64 → 84×84")
    for name, ms in results.items():
        print(f"  {name:7s} {ms:7.1f} ms/batch  ({ms / 64:.3f} ms/image)")
    print(f"  kornia / ours = {results['kornia'] / results['ours']:.2f}× the time")


if __name__ == "__main__":
    main()
