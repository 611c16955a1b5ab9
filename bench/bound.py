"""The arithmetic bound of a training step: FLOP per image (counted) over the CPU's peak FLOP/s.

    from bound import peak_flops, training_flops_per_image

The fraction of the bound a measured rate reaches says how much speed is left to find.

* FLOP per image: counted by ``torch.utils.flop_counter.FlopCounterMode`` over one forward and
  backward pass of the model at the bench's input size (convolutions and matrix products; a
  multiply-add is 2 FLOP; element-wise ops — batch-norm, activations, pooling — are not counted
  and are what keeps a real step below the bound).
* Peak FLOP/s = cores × clock × FLOP per cycle per core, from the CPU's flags (``PER_CYCLE``):
  vector width × 2 (a fused multiply-add) × 2 FMA pipes, the usual count for the cores these
  flags come with. Cores: the CPUs this process may run on (a VM whose vCPUs are hyperthreads
  of fewer physical cores has a lower true bound); clock: ``cpu MHz`` of /proc/cpuinfo (the
  current clock, not a turbo peak). A CPU that reports AVX-512 but executes it on 256-bit pipes
  (AMD Zen 4) reaches half the count given here.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

# (flag that must be present, precision, FLOP per cycle per core, what it stands for); first match wins
PER_CYCLE = (
    ("amx_bf16", "bf16", 1024, "AMX-BF16 tiles (1024 FLOP/cycle)"),
    ("avx512_bf16", "bf16", 128, "AVX512-BF16 dot products (2 × 16 lanes × 2 × 2)"),
    ("avx512f", "fp32", 64, "AVX-512 FMA (2 pipes × 16 lanes × 2)"),
    ("fma", "fp32", 32, "AVX2 FMA (2 pipes × 8 lanes × 2)"),
    ("sse2", "fp32", 8, "SSE2 (4 lanes × 2)"),
)


def flop_per_cycle(flags: frozenset[str], precision: str) -> tuple[int, str]:
    """FLOP per cycle per core for ``precision`` ("fp32"/"bf16") on a CPU with ``flags``.

    bf16 without a bf16 instruction set runs at fp32's rate or below (it is emulated), so its
    bound is fp32's.
    """
    for flag, prec, count, what in PER_CYCLE:
        if flag in flags and (prec == precision or prec == "fp32"):
            return count, what
    return 2, "scalar (no vector flags found)"


def clock_ghz() -> float | None:
    """The first CPU's current clock from /proc/cpuinfo, in GHz (None where not reported)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("cpu mhz"):
                return float(line.split(":")[1]) / 1000
    return None


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def peak_flops(flags: frozenset[str], precision: str, n_cores: int, ghz: float) -> tuple[float, str]:
    """(peak FLOP/s, how it was computed) for ``n_cores`` at ``ghz``."""
    per_cycle, what = flop_per_cycle(flags, precision)
    peak = n_cores * ghz * 1e9 * per_cycle
    return (
        peak,
        f"{n_cores} cores × {ghz:.2f} GHz × {per_cycle} FLOP/cycle ({what}) = {peak / 1e9:.0f} GFLOP/s",
    )


def training_flops_per_image(
    model: torch.nn.Module, image_size: int, num_classes: int, batch: int = 2
) -> float:
    """FLOP of one training step's forward + backward per image (counted; see the module).

    ``model(x, labels)`` must return ``(logits, scores)`` (negmargin's ``FewShotModel``).
    Counted on a copy of the model in fp32, so the caller's weights and buffers are unchanged.
    """
    import copy

    m = copy.deepcopy(model).float().train()
    x = torch.randn(batch, 3, image_size, image_size, device=next(m.parameters()).device)
    y = torch.arange(batch, device=x.device) % num_classes
    with FlopCounterMode(display=False) as counter:
        logits, _ = m(x, y)
        F.cross_entropy(logits, y).backward()
    return counter.get_total_flops() / batch
