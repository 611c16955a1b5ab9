"""Helpers shared by the speed benchmarks (train_speed, loaded, gpu_check, metatest).

Generated JPEGs of a CUB-like size, one training step as ``negmargin.train.run`` takes it,
an endless stream of our loader's batches, a timed loop, and a process that keeps one core
busy (the "loaded" condition).
"""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from negmargin.loader import TrainLoader
from negmargin.model import FewShotModel
from negmargin.runtime import Runtime


def make_jpegs(root: Path, n_classes: int, per_class: int) -> None:
    """``root/classNNN/NNNN.jpg``: CUB-sized (500 × 375) noisy stripes, quality 90, seeded."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:375, 0:500] / 500
    for c in range(n_classes):
        folder = root / f"class{c:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            phase = rng.uniform(0, 6, 3)
            img = np.stack([127 + 90 * np.sin(7 * xx * (k + 1) + 5 * yy + phase[k]) for k in range(3)], -1)
            img = np.clip(img + rng.normal(0, 20, img.shape), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(folder / f"{i:04d}.jpg", quality=90)


def train_step(model: FewShotModel, opt, rt: Runtime, x, y) -> None:
    """One step of negmargin.train.run's loop: autocast forward, loss, backward, SGD."""
    device = rt.device
    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    with rt.autocast():
        logits, _ = model(x, y)
    loss = F.cross_entropy(logits, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()


def our_batches(loader: TrainLoader):
    """(images, labels) of our loader, epoch after epoch, without end."""
    epoch = 0
    while True:
        for x, y, _ in loader.epoch(epoch):
            yield x, y
        epoch += 1


def timed_steps(step, batches, warmup: int, steps: int, batch_size: int = 64) -> float:
    """Images/s over ``steps`` consecutive steps after ``warmup`` (wall time, data waits included)."""
    it = iter(batches)
    for _ in range(warmup):
        step(*next(it))
    t0 = time.perf_counter()
    for _ in range(steps):
        step(*next(it))
    return batch_size * steps / (time.perf_counter() - t0)


def _burn() -> None:
    while True:
        pass


class CpuBurner:
    """A second process spinning on one core for the duration of a ``with`` block."""

    def __enter__(self):
        self.proc = multiprocessing.get_context("spawn").Process(target=_burn, daemon=True)
        self.proc.start()
        time.sleep(0.5)  # let it reach the loop
        return self

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.join()
