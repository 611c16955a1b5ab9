"""The training input path: packed cache → crops → batched augmentation on the device.

Per batch, on the CPU (in ``train.workers`` background threads, ahead of the
model): pick the indices, draw the augmentation parameters, cut each crop box
out of the memory-mapped cache into one uint8 buffer. On the training device:
resize + flip + jitter + normalise the whole batch at once
(:func:`negmargin.augment.train_batch`).

Everything random is a pure function of (seed, epoch, iteration, rank): the
sampler permutes the split with ``PCG64([seed, epoch])`` and each batch draws
its augmentation from ``PCG64([seed, epoch, iteration, rank])``. Resuming at an
(epoch, iteration) therefore replays exactly the batches an uninterrupted run
would have seen, with no generator state to save.

Under torchrun, rank r takes the strided share ``perm[r::world]`` of each
epoch's permutation: the ranks' samples are disjoint and together cover the
split. Each rank's share is padded to whole batches with its own first samples
(every batch is full, as with the reference's infinite sampler), so all ranks
run the same number of iterations.
"""

from __future__ import annotations

import concurrent.futures as cf
import math
import time
from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

from .augment import eval_view, normalize, sample_params, train_batch
from .config import Config
from .datasets import PackedSplit


def cut_crops(images: list[np.ndarray], boxes: np.ndarray, pin: bool = False) -> Tensor:
    """Cut box i out of image i into one buffer, what :func:`negmargin.augment.train_batch` takes.

    Args:
        images: B arrays (H_i, W_i, C) uint8 (memory-mapped cache views).
        boxes: (B, 4) int (top, left, height, width).

    Returns:
        (B, max h, max w, C) uint8; crop i occupies ``[:h_i, :w_i]`` (the rest is
        left uninitialised). Pinned when ``pin`` (for a non-blocking copy to a GPU).
    """
    hw = boxes[:, 2:]
    channels = images[0].shape[2]
    buf = torch.empty(
        (len(images), int(hw[:, 0].max()), int(hw[:, 1].max()), channels), dtype=torch.uint8, pin_memory=pin
    )
    view = buf.numpy()
    for b, (image, (top, left, h, w)) in enumerate(zip(images, boxes)):
        view[b, :h, :w] = image[top : top + h, left : left + w]
    return buf


class EpochSampler:
    """Indices of each epoch for one rank, padded to whole batches."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> None:
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.per_rank = math.ceil(n / world)
        self.iterations = math.ceil(self.per_rank / batch_size)

    def indices(self, epoch: int) -> np.ndarray:
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        mine = perm[self.rank :: self.world]
        return np.resize(mine, self.iterations * self.batch_size)  # wraps around its own share

    def batch(self, epoch: int, iteration: int, indices: np.ndarray | None = None) -> np.ndarray:
        idx = self.indices(epoch) if indices is None else indices
        return idx[iteration * self.batch_size : (iteration + 1) * self.batch_size]


class TrainLoader:
    """Iterate (images, labels) batches of one epoch on the training device."""

    def __init__(
        self,
        packed: PackedSplit,
        cfg: Config,
        batch_size: int,
        device: torch.device,
        rank: int = 0,
        world: int = 1,
        channels_last: bool = True,
    ) -> None:
        self.packed, self.cfg, self.device = packed, cfg, device
        self.channels_last = channels_last
        self.sampler = EpochSampler(len(packed), batch_size, cfg.train.seed, rank, world)
        self.rank = rank
        self.labels = torch.from_numpy(packed.labels)
        self.pin = device.type == "cuda"
        cap = cfg.train.max_iters_per_epoch
        self.iterations = min(self.sampler.iterations, cap) if cap else self.sampler.iterations

    def __len__(self) -> int:
        return self.iterations

    # ------------------------------------------------------------------ CPU part
    def prepare(self, epoch: int, iteration: int, indices: np.ndarray) -> dict:
        """Everything of one batch that happens on the CPU: indices, parameters, crops."""
        t0 = time.perf_counter()
        idx = self.sampler.batch(epoch, iteration, indices)
        cfg = self.cfg
        labels = self.labels[idx]
        if not cfg.augment.enabled:
            batch = np.stack(
                [
                    eval_view(
                        self.packed.image(i), cfg.test_resize, cfg.data.image_size, cfg.augment.interpolation
                    )
                    for i in idx
                ]
            )
            pixels = torch.from_numpy(batch)
            return {
                "pixels": pixels.pin_memory() if self.pin else pixels,
                "labels": labels,
                "params": None,
                "hw": None,
                "cpu_time": time.perf_counter() - t0,
            }
        rng = np.random.default_rng([cfg.train.seed, epoch, iteration, self.rank])
        params = sample_params(rng, self.packed.heights[idx], self.packed.widths[idx], cfg.augment)
        buf = cut_crops([self.packed.image(int(i)) for i in idx], params.boxes, self.pin)
        return {
            "pixels": buf,
            "labels": labels,
            "params": params,
            "hw": torch.from_numpy(params.boxes[:, 2:]),
            "cpu_time": time.perf_counter() - t0,
        }

    # ------------------------------------------------------------------ device part
    def finish(self, item: dict) -> tuple[Tensor, Tensor]:
        cfg = self.cfg
        pixels = item["pixels"].to(self.device, non_blocking=True)
        if item["params"] is None:
            x = normalize(pixels.permute(0, 3, 1, 2).float(), cfg.data.mean, cfg.data.std)
        else:
            hw = item["hw"].to(self.device, non_blocking=True)
            x = train_batch(
                pixels, hw, item["params"], cfg.augment, cfg.data.image_size, cfg.data.mean, cfg.data.std
            )
        x = x.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
        return x, item["labels"].to(self.device, non_blocking=True)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[Tensor, Tensor, float]]:
        """Yield (images, labels, data_time) for iterations ``start..len-1`` of ``epoch``.

        ``data_time`` is how long the training loop waited for this batch.
        """
        workers = self.cfg.train.workers
        indices = self.sampler.indices(epoch)
        if workers <= 0:
            for it in range(start, self.iterations):
                t0 = time.perf_counter()
                images, labels = self.finish(self.prepare(epoch, it, indices))
                yield images, labels, time.perf_counter() - t0
            return
        # On the CPU the whole batch (cut + augment) is made in the background
        # threads, overlapping the model's step; on a GPU the threads cut crops
        # into pinned memory and the main thread runs the batched augmentation.
        on_cpu = self.device.type == "cpu"

        def make(it: int):
            item = self.prepare(epoch, it, indices)
            return self.finish(item) if on_cpu else item

        depth = 2 * workers
        with cf.ThreadPoolExecutor(workers, thread_name_prefix="negmargin-loader") as pool:
            pending: dict[int, cf.Future] = {}
            nxt = start
            for it in range(start, self.iterations):
                while nxt < self.iterations and len(pending) < depth:
                    pending[nxt] = pool.submit(make, nxt)
                    nxt += 1
                t0 = time.perf_counter()
                result = pending.pop(it).result()
                images, labels = result if on_cpu else self.finish(result)
                yield images, labels, time.perf_counter() - t0
