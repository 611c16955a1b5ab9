"""What this CPU is: its model name and feature flags, read once from ``/proc/cpuinfo``."""

from __future__ import annotations

import contextlib
import functools
import platform
from pathlib import Path


@functools.cache
def cpu_info() -> tuple[str, frozenset[str]]:
    """This CPU's model name and its feature flags (empty where /proc/cpuinfo is not there)."""
    model, flags = platform.processor() or platform.machine(), frozenset[str]()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            key = key.strip().lower()
            if key in ("model name", "hardware") and value.strip():
                model = value.strip()
            elif key in ("flags", "features") and not flags:
                flags = frozenset(value.split())
    return model, flags
