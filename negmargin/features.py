"""Feature extraction: a frozen backbone over a split's images under the test transform, and its cache."""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from . import distributed as dist
from .augment import eval_view, to_input
from .datasets import PackedSplit
from .fileio import atomic_save
from .finetune import cpu_workers, intra_op_threads
from .runtime import Runtime

if TYPE_CHECKING:
    from .config import Config


def image_batches(
    packed: PackedSplit, cfg: Config, batch_size: int, indices: Sequence[int] | np.ndarray | None = None
) -> Iterator[np.ndarray]:
    """Yield (B, size, size, C) uint8 arrays of a split (or of ``indices`` of it, in that
    order) under the test transform."""
    size, short, mode = cfg.data.image_size, cfg.test_resize, cfg.augment.interpolation
    order = range(len(packed)) if indices is None else [int(i) for i in indices]
    for start in range(0, len(order), batch_size):
        part = order[start : start + batch_size]
        yield np.stack([eval_view(packed.image(i), short, size, mode) for i in part])


def extract_features(
    backbone: nn.Module,
    packed: PackedSplit,
    cfg: Config,
    runtime: Runtime,
    progress: bool = True,
    desc: str = "extract features",
    indices: Sequence[int] | np.ndarray | None = None,
) -> Tensor:
    """Features of a split's images: frozen backbone, eval mode, test transform.

    Returns (N, D) float32 on ``runtime.device`` for every image, or
    (len(indices), D) for ``indices`` (row i = image ``indices[i]``) when given.
    """
    was_training = backbone.training
    backbone.eval()
    total = len(packed) if indices is None else len(indices)
    bar = tqdm(total=total, desc=desc, unit="img", disable=not progress, dynamic_ncols=True, leave=False)

    def embed(batch: np.ndarray) -> Tensor:
        # grad mode and autocast are per thread: set in the thread that runs the batch
        with torch.no_grad(), runtime.autocast():
            x = to_input(batch, cfg.data.mean, cfg.data.std, runtime.device, runtime.memory_format)
            f = backbone(x).float()
        bar.update(len(batch))
        return f

    batches = image_batches(packed, cfg, cfg.finetune.feature_batch_size, indices)
    workers = cpu_workers(runtime.device)
    if workers > 1:
        # All cores, one batch each (same batches, same per-batch results as one after the
        # other): a convolution split over both cores of a busy machine waits for the slowed
        # one at every op; whole batches per core do not (bench/loaded.py, test.py rows).
        feats = []
        with intra_op_threads(1), cf.ThreadPoolExecutor(workers) as pool:
            pending: list[cf.Future] = []
            for batch in batches:  # at most 2 batches per core in memory at once
                pending.append(pool.submit(embed, batch))
                if len(pending) >= 2 * workers:
                    feats.append(pending.pop(0).result())
            feats += [f.result() for f in pending]
    else:
        feats = [embed(batch) for batch in batches]
    bar.close()
    backbone.train(was_training)
    return torch.cat(feats)


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
