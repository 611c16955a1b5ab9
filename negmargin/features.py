"""Features: a frozen backbone over images under the test transform — the one path for a
split's images (meta-test, validation) and a user's (prediction) — and the split feature cache."""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn

from . import distributed as dist
from .augment import eval_view, to_input
from .datasets import PackedSplit
from .fileio import atomic_save
from .finetune import cpu_workers, intra_op_threads
from .runlog import progress_bar
from .runtime import Runtime

if TYPE_CHECKING:
    from .config import Config


def embed(
    backbone: nn.Module,
    count: int,
    view: Callable[[int], np.ndarray | None],
    cfg: Config,
    runtime: Runtime,
    batch_size: int,
    progress: bool = False,
    desc: str = "embed",
) -> tuple[Tensor, list[int]]:
    """The one image → feature path: a split's images and a user's images alike.

    ``view(i)`` gives item ``i`` of ``range(count)`` as an (H, W, C) uint8 image, or
    None to leave it out (an unreadable file the caller chose to skip); it is called
    in the worker thread that embeds the item's batch. Each image gets the test
    transform (resize the short side, centre crop), then the frozen backbone in eval
    mode under the runtime's precision and memory format.

    Returns (M, D) float32 features on ``runtime.device`` of the M items that gave an
    image, in order, and their positions in ``range(count)``.
    """
    was_training = backbone.training
    backbone.eval()
    size, short, mode = cfg.data.image_size, cfg.test_resize, cfg.augment.interpolation
    workers = cpu_workers(runtime.device)
    if workers > 1:  # a small set still fills every core
        batch_size = min(batch_size, max(8, math.ceil(count / (2 * workers))))
    bar = progress_bar(total=count, desc=desc, unit="img", enabled=progress, leave=False)

    def one_batch(start: int) -> tuple[Tensor | None, list[int]]:
        views, kept = [], []
        for i in range(start, min(start + batch_size, count)):
            image = view(i)
            if image is not None:
                views.append(eval_view(image, short, size, mode))
                kept.append(i)
        feats = None
        if views:
            # grad mode and autocast are per thread: set in the thread that runs the batch
            with torch.no_grad(), runtime.autocast():
                x = to_input(
                    np.stack(views), cfg.data.mean, cfg.data.std, runtime.device, runtime.memory_format
                )
                feats = backbone(x).float()
        bar.update(min(batch_size, count - start))
        return feats, kept

    starts = range(0, count, batch_size)
    results: list[tuple[Tensor | None, list[int]]] = []
    try:
        if workers > 1:
            # All cores, one batch each (same batches, same per-batch results as one after the
            # other): a convolution split over both cores of a busy machine waits for the slowed
            # one at every op; whole batches per core do not (bench/loaded.py, test.py rows).
            with intra_op_threads(1), cf.ThreadPoolExecutor(workers) as pool:
                pending: list[cf.Future] = []
                for start in starts:  # at most 2 batches per core in memory at once
                    pending.append(pool.submit(one_batch, start))
                    if len(pending) >= 2 * workers:
                        results.append(pending.pop(0).result())
                results += [f.result() for f in pending]
        else:
            results = [one_batch(start) for start in starts]
    finally:
        bar.close()  # on an error too, so the error line stands alone
        backbone.train(was_training)
    feats = [f for f, _ in results if f is not None]
    kept = [i for _, mine in results for i in mine]
    out = torch.cat(feats) if feats else torch.empty(0, backbone_dim(backbone), device=runtime.device)
    return out, kept


def backbone_dim(backbone: nn.Module) -> int:
    return int(getattr(backbone, "num_features", 0))


def extract_features(
    backbone: nn.Module,
    packed: PackedSplit,
    cfg: Config,
    runtime: Runtime,
    progress: bool = True,
    desc: str = "extract features",
    indices: Sequence[int] | np.ndarray | None = None,
) -> Tensor:
    """Features of a split's images (:func:`embed` of the packed images).

    Returns (N, D) float32 on ``runtime.device`` for every image, or
    (len(indices), D) for ``indices`` (row i = image ``indices[i]``) when given.
    """
    order = range(len(packed)) if indices is None else [int(i) for i in indices]
    feats, _ = embed(
        backbone, len(order), lambda i: packed.image(order[i]), cfg, runtime,
        cfg.finetune.feature_batch_size, progress, desc,
    )  # fmt: skip
    return feats


def feature_cache_key(backbone: nn.Module, packed: PackedSplit, cfg: Config, precision: str) -> str:
    """Checkpoint content + split + transform → a hex key."""
    h = hashlib.sha256()
    for name, tensor in sorted(backbone.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    h.update(
        repr(
            (
                packed.manifest["fingerprint"],
                packed.manifest["policy"],
                packed.split,
                cfg.data.image_size,
                cfg.test_resize,
                tuple(cfg.data.mean),
                tuple(cfg.data.std),
                cfg.augment.interpolation,
                precision,
            )
        ).encode()
    )
    return h.hexdigest()[:20]


def cached_features(
    backbone: nn.Module,
    packed: PackedSplit,
    cfg: Config,
    runtime: Runtime,
    cache_dir: Path | None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> Tensor:
    """:func:`extract_features`, reusing ``cache_dir/<split>-<key>.pt`` when the key matches."""
    path = None
    if cache_dir is not None:
        key = feature_cache_key(backbone, packed, cfg, runtime.precision)
        path = Path(cache_dir) / f"{packed.split}-{key}.pt"
        if path.is_file():
            try:
                feats = torch.load(path, map_location="cpu", weights_only=True)
                if isinstance(feats, Tensor) and feats.shape[0] == len(packed):
                    log(f"features of {packed.split} loaded from cache {path}")
                    return feats.to(runtime.device)
            except Exception:  # noqa: BLE001 - a damaged cache file is rebuilt
                pass
    feats = extract_features(
        backbone, packed, cfg, runtime, progress=progress, desc=f"extract {packed.split} features"
    )
    if path is not None and dist.is_main():
        atomic_save(path, lambda f: torch.save(feats.cpu(), f))
    return feats
