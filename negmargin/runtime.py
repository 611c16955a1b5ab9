"""Runtime choices, resolved once per run: device, precision, channels-last, seeding.

:func:`resolve` is the one place where every "None/auto means derived" value of a
config becomes explicit; training, the meta-test of a checkpoint and prediction
all start from it, and the dumped config holds what it resolved.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import platform
import random
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import distributed as dist
from .config import Config
from .cpu import cpu_info
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


# x86 flags (/proc/cpuinfo "flags") and ARM features ("Features") of bf16 arithmetic in hardware.
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})
# Measured with bench/train_speed.py on an AVX2-only AMD EPYC (2 cores, idle): a CUB Conv4
# training step took 6.05 s in bf16 against 1.01 s in fp32; on a Xeon with AMX bf16 ran 280 img/s
# against 164 in fp32 (channels-last).
EMULATED_BF16_COST = "about 6x slower than fp32 (measured: Conv4 step 6.05 s vs 1.01 s on an AVX2-only CPU)"


def native_bf16(flags: frozenset[str] | None = None) -> bool:
    """Whether the CPU does bf16 arithmetic in hardware (``flags``: this CPU's by default)."""
    return bool(NATIVE_BF16_FLAGS & (cpu_info()[1] if flags is None else flags))


def choose_precision(requested: str, device: torch.device, flags: frozenset[str] | None = None) -> str:
    """``auto`` → bf16 on CUDA and on CPUs with native bf16, else fp32; an explicit bf16 on a CPU
    without it runs as asked, after a one-line warning on stderr with the expected cost."""
    native = device.type == "cuda" or native_bf16(flags)
    if requested == "auto":
        return "bf16" if native else "fp32"
    if requested == "bf16" and not native and dist.is_main():
        print(
            f"warning: train.precision='bf16' on a CPU without native bf16 ({cpu_info()[0]}): "
            f"{EMULATED_BF16_COST}; 'auto' or 'fp32' is faster here",
            file=sys.stderr,
        )
    return requested


# glibc's mallopt() parameters (malloc.h) and the defaults it starts with.
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_GLIBC_MMAP_MAX, _GLIBC_TRIM_THRESHOLD = 65536, 128 * 1024


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    if platform.libc_ver()[0] != "glibc":
        return None
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None)
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        return libc
    return None


def retain_freed_memory(retain: bool = True) -> bool:
    """Have glibc's malloc keep freed memory in the process (``retain``) or follow its defaults.

    By default glibc serves every block over 32 MB with a fresh ``mmap`` and returns it on
    free, so each training step's large activations (116 MB per tensor in Conv4's first block
    at batch 64) arrive on new pages that the kernel zero-fills, one page fault per 4 KB:
    ~118,000 faults and a quarter of the CPU time of a Conv4 step on an AVX2 EPYC. Retaining
    turns off mmap for large blocks and trimming of the heap, so the next step reuses the
    pages. No effect on results (the same arithmetic on other addresses). Returns whether it
    applied: False where the C library is not glibc (macOS, musl), where it is a no-op.
    ``retain=False`` restores glibc's starting values (its dynamic thresholds stay off) and
    hands the free memory back (``malloc_trim``), so that large blocks fault in again as they
    do by default (for benchmarks that compare the two in one process).
    """
    libc = _glibc()
    if libc is None:
        return False
    mmap_max, trim = (0, 2**31 - 1) if retain else (_GLIBC_MMAP_MAX, _GLIBC_TRIM_THRESHOLD)
    ok = bool(libc.mallopt(_M_MMAP_MAX, mmap_max)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, trim))
    if not retain:
        libc.malloc_trim(0)
    return ok


def machine_line(runtime: Runtime) -> str:
    """Where and how a run runs, for its log and its resolved config."""
    where = torch.cuda.get_device_name(runtime.device) if runtime.device.type == "cuda" else cpu_info()[0]
    native = "native" if runtime.device.type == "cuda" or native_bf16() else "no native"
    return f"device {runtime.device} ({where}, {native} bf16); precision {runtime.precision}"


def peak_memory_mib(device: torch.device) -> int:
    """The run's memory high-water mark in MiB: peak CUDA memory allocated on a GPU (as mmcv
    logs it), else this process's peak resident set (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device) / 2**20)
    try:
        import resource
    except ImportError:  # Windows
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak / 2**20 if sys.platform == "darwin" else peak / 2**10)


def resolve(cfg: Config, num_classes: int | None = None) -> tuple[Config, Runtime]:
    """The config with every derived value explicit, and the runtime it describes.

    Resolved: ``train.device`` (``auto`` → CUDA when present, per LOCAL_RANK),
    ``train.precision`` (:func:`choose_precision`), ``data.test_resize``,
    ``val.steps`` / ``meta_test.steps`` (the protocol's 150 / 600 rule) and, when
    training, ``model.num_classes`` (the train split's classes unless set).
    """
    device = dist.local_device(cfg.train.device)
    precision = choose_precision(cfg.train.precision, device)
    resolved = cfg.resolved(str(device), precision, num_classes)
    return resolved, Runtime(device, precision, cfg.train.channels_last == "on")


def configure_process(cfg: Config, runtime: Runtime) -> None:
    """Process-wide settings of a training or test run: on a CPU with
    ``train.cpu_malloc="retain"``, malloc keeps freed memory (:func:`retain_freed_memory`).
    Not done for the prediction API, which runs inside a user's own process."""
    if runtime.device.type == "cpu" and cfg.train.cpu_malloc == "retain":
        retain_freed_memory()


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
