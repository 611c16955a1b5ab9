"""Runtime choices, resolved once per run: device, precision, channels-last, seeding.

:func:`resolve` is the one place where every "None/auto means derived" value of a
config becomes explicit; training, the meta-test of a checkpoint and prediction
all start from it, and the dumped config holds what it resolved.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import distributed as dist
from .config import Config
from .fileio import ensure_writable_dir
from .runlog import RunLog


@dataclass(frozen=True)
class Runtime:
    """Where and how the model runs: threaded through training, validation and extraction."""

    device: torch.device
    precision: str  # "fp32" or "bf16"
    channels_last: bool

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return torch.bfloat16 if self.precision == "bf16" else None

    def autocast(self) -> contextlib.AbstractContextManager:
        """Reduced precision for the block when ``precision`` says so (a no-op in fp32)."""
        dtype = self.autocast_dtype
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format


def resolve(cfg: Config, num_classes: int | None = None) -> tuple[Config, Runtime]:
    """The config with every derived value explicit, and the runtime it describes.

    Resolved: ``train.device`` (``auto`` → CUDA when present, per LOCAL_RANK),
    ``train.precision`` (``auto`` → bf16 on CUDA, fp32 on CPU), ``data.test_resize``,
    ``val.steps`` / ``meta_test.steps`` (the protocol's 150 / 600 rule) and, when
    training, ``model.num_classes`` (the train split's classes unless set).
    """
    device = dist.local_device(cfg.train.device)
    precision = cfg.train.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    resolved = cfg.resolved(str(device), precision, num_classes)
    return resolved, Runtime(device, precision, cfg.train.channels_last == "on")


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


@contextlib.contextmanager
def main_first() -> Iterator[bool]:
    """Run the block on rank 0 first, then on the other ranks (e.g. building a cache
    that the others then open); yields whether this process is rank 0."""
    main = dist.is_main()
    if not main:
        dist.barrier()
    yield main
    if main:
        dist.barrier()


def start_run(cfg: Config, work_dir: Path, progress: bool, log_files: bool = True) -> tuple[RunLog, bool]:
    """What training and the meta-test of a checkpoint share before any data is read:
    the process group (under torchrun), a writable work dir (rank 0), the run log.

    Returns the log (only rank 0 writes; in ``work_dir`` when ``log_files``) and whether
    this process shows progress bars.
    """
    dist.init(dist.local_device(cfg.train.device))
    main = dist.is_main()
    if main:
        ensure_writable_dir(work_dir)
    dist.barrier()
    return RunLog(work_dir if log_files else None, enabled=main), progress and main
