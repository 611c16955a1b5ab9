"""The training input path: packed cache → crops → batched augmentation on the device.

Per batch, on the CPU (in ``train.workers`` background threads, ahead of the
model): pick the indices, draw the augmentation parameters, cut each crop box
out of the memory-mapped cache into one uint8 buffer. In the training thread, on
the training device: resize + flip + jitter + normalise the whole batch at once
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
import statistics
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


class Placement:
    """Where a CPU run's augmentation runs: in the training thread or in the loader's
    background threads, chosen by timing both. The batches are the same either way.

    Alone on its cores a step is fastest with the augmentation in line: in a background
    thread its torch ops run on a thread team of their own beside the step's and slow it
    by more than the ~17 ms they take in line (CUB Conv4 bf16 on a 2-core Xeon: 455 vs
    428 img/s). With another process busy on one of the cores it is the other way round
    (149 vs 95 img/s). So the first ``probe`` iterations of a ``cycle`` run the other way,
    and at the cycle's end the faster way — median wall time per iteration — is kept; the
    other must be faster by ``margin`` to take over. After a probe that changes nothing the
    next comes twice as many cycles later (at most ``max_every``); after a change, at the
    next cycle: a steady machine pays for few probes, a changed one is noticed within
    ``max_every`` cycles.

    A batch made in the background is made ``lag`` iterations ahead (the loader's queue
    depth), during earlier steps, so the iterations next to a change carry the other
    way's cost: the comparison counts ``measure`` iterations of each way, skipping
    ``settle`` at the probe's start and ``lag`` at the end of the probe and of the cycle.
    Measured in bench/input_path.py and docs/benchmarks.md.
    """

    def __init__(
        self,
        lag: int,
        cycle: int = 200,
        measure: int = 8,
        settle: int = 2,
        margin: float = 0.05,
        max_every: int = 8,
    ) -> None:
        self.probe = settle + measure + lag
        if lag < 0 or measure < 2 or settle < 0 or cycle < 2 * self.probe:
            raise ValueError(f"cycle {cycle} too short for probes of {self.probe} iterations (lag {lag})")
        self.lag, self.cycle, self.measure, self.settle, self.margin = lag, cycle, measure, settle, margin
        self.in_background = False  # the way kept; in line first
        self.every, self.max_every = 1, max_every  # probe in cycles c with c % every == 0
        self.times: dict[int, tuple[bool, float]] = {}  # iteration → (in background, seconds)
        self.notes: list[str] = []  # what changed, for the run log

    def choose(self, iteration: int) -> bool:
        """Whether global ``iteration`` is to be augmented in a background thread."""
        probing = (iteration // self.cycle) % self.every == 0 and iteration % self.cycle < self.probe
        return self.in_background != probing

    def record(self, iteration: int, in_background: bool, seconds: float) -> None:
        """One iteration's wall time (its wait, its augmentation if in line, and the step)."""
        self.times[iteration] = (in_background, seconds)
        if iteration % self.cycle != self.cycle - 1:
            return
        start, end = iteration - self.cycle + 1, iteration - self.lag

        def times(first: int, stop: int, background: bool) -> list[float]:
            found = (self.times.get(i) for i in range(first, stop))
            return [r[1] for r in found if r is not None and r[0] == background]

        other = times(start + self.settle, start + self.probe - self.lag, not self.in_background)
        kept = times(end - self.measure + 1, end + 1, self.in_background)
        self.times.clear()
        if min(len(other), len(kept)) < self.measure // 2:
            return  # no probe in this cycle, or too few measurements (an epoch boundary, a resume)
        a, b = statistics.median(other), statistics.median(kept)
        self.every = min(2 * self.every, self.max_every)
        if a < (1 - self.margin) * b:
            self.in_background, self.every = not self.in_background, 1
            where = "background threads" if self.in_background else "training thread"
            self.notes.append(
                f"input path: augmenting in the {where} from iteration {iteration + 1} "
                f"({1000 * a:.0f} vs {1000 * b:.0f} ms per iteration)"
            )


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
        self.depth = 2 * cfg.train.workers  # batches queued ahead by the background threads
        self.placement = Placement(lag=self.depth)

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
        # The threads cut crops (into pinned memory for a GPU). The augmentation runs in
        # the training thread on a GPU (batched kernels) and, on the CPU, where
        # ``self.placement`` finds it faster: in line or in background threads. Those are
        # threads of their own, ended as soon as the augmentation moves back in line: a
        # thread that has run torch ops keeps a thread team that slows the training
        # thread's steps for as long as it lives (CUB Conv4 bf16, 2-core Xeon: ~155 against
        # ~143 ms per step in line), even idle.
        on_cpu = self.device.type == "cpu"
        placement = self.placement

        def make(it: int, in_background: bool):
            item = self.prepare(epoch, it, indices)
            return self.finish(item) if in_background else item

        depth = self.depth
        augmenters: cf.ThreadPoolExecutor | None = None
        with cf.ThreadPoolExecutor(workers, thread_name_prefix="negmargin-loader") as cutters:
            try:
                pending: dict[int, tuple[bool, cf.Future]] = {}
                nxt = start
                t_prev = None
                for it in range(start, self.iterations):
                    while nxt < self.iterations and len(pending) < depth:
                        bg = on_cpu and placement.choose(epoch * self.iterations + nxt)
                        if not bg:
                            if augmenters is not None:
                                augmenters.shutdown(wait=False)  # its queued batches still finish
                                augmenters = None
                            pool = cutters
                        else:
                            if augmenters is None:
                                augmenters = cf.ThreadPoolExecutor(
                                    workers, thread_name_prefix="negmargin-augment"
                                )
                            pool = augmenters
                        pending[nxt] = (bg, pool.submit(make, nxt, bg))
                        nxt += 1
                    t0 = time.perf_counter()
                    bg, future = pending.pop(it)
                    result = future.result()
                    images, labels = result if bg else self.finish(result)
                    yield images, labels, time.perf_counter() - t0
                    now = time.perf_counter()
                    if on_cpu and t_prev is not None:  # an epoch's first iteration waited for its start
                        placement.record(epoch * self.iterations + it, bg, now - t_prev)
                    t_prev = now
            finally:
                if augmenters is not None:
                    augmenters.shutdown(wait=True)
