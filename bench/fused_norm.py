"""The fused batch-norm kernel against ATen's layers, one block tail at a time.

    python bench/fused_norm.py [--precision bf16] [--rounds 5]

For each block tail of Conv4 and ResNet12 at batch 64, 84×84 (the shapes a training step
sees), channels-last: forward + backward of ATen's layers (batch norm [+ the shortcut's
batch norm + add] + activation [+ 2×2 max pooling]) and of ``fused_norm.norm_act``, the
two taking turns, median over ``--rounds`` rounds of a few calls each; and the time to copy
the block's input tensor once (``clone``: one read and one write of it, the memory's pace).
Prints milliseconds and the ratio ATen / fused, measured in one run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from negmargin import fused_norm  # noqa: E402
from negmargin.cpu import cpu_info  # noqa: E402
from negmargin.runtime import retain_freed_memory  # noqa: E402

# (name, channels, side, activation, shortcut, pool): the calls a training step makes.
TAILS = [
    ("Conv4 block 1", 64, 84, "relu", False, True),
    ("Conv4 block 2", 64, 42, "relu", False, True),
    ("ResNet12 layer1 norm1/norm2", 64, 84, "leaky_relu", False, False),
    ("ResNet12 layer1 norm3 + shortcut", 64, 84, "leaky_relu", True, True),
    ("ResNet12 layer2 norm1/norm2", 160, 42, "leaky_relu", False, False),
    ("ResNet12 layer2 norm3 + shortcut", 160, 42, "leaky_relu", True, True),
    ("ResNet12 layer4 norm3 + shortcut", 640, 10, "leaky_relu", True, True),
]


def aten(x, bn, act, x2, bn2, pool):
    z = bn(x) + (bn2(x2) if x2 is not None else 0)
    y = F.relu(z) if act == "relu" else F.leaky_relu(z, 0.1)
    return F.max_pool2d(y, 2) if pool else y


def timed(fn, calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=3, help="calls per round and variant")
    args = parser.parse_args()
    retain_freed_memory(True)  # as training sets it
    fused_norm.load()
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    print(
        f"torch {torch.__version__}, {cpu_info()[0]}, {torch.get_num_threads()} threads; {args.precision}, "
        f"channels-last, batch 64; forward + backward, ms (median of {args.rounds} rounds)"
    )
    print(f"{'block tail':<34} {'input':>18} {'clone':>7} {'ATen':>8} {'fused':>8} {'ATen/fused':>10}")
    gen = torch.Generator().manual_seed(0)
    for name, c, side, act, two, pool in TAILS:
        clone, a, f = measure((64, c, side, side), act, two, pool, dtype, gen, args.rounds, args.calls)
        shape = "×".join(map(str, (64, c, side, side)))
        print(f"{name:<34} {shape:>18} {clone:>7.2f} {a:>8.2f} {f:>8.2f} {a / f:>10.2f}")


def measure(shape, act, two, pool, dtype, gen, rounds: int, calls: int) -> tuple[float, float, float]:
    """Median ms of (a clone of the input, ATen's layers, the fused kernel), forward + backward."""

    def make():
        return torch.randn(shape, generator=gen).to(dtype).contiguous(memory_format=torch.channels_last)

    c = shape[1]
    x, x2 = make().requires_grad_(), make().requires_grad_() if two else None
    bn, bn2 = nn.BatchNorm2d(c), nn.BatchNorm2d(c) if two else None
    out = (shape[0], c, shape[2] // 2, shape[3] // 2) if pool else shape
    dy = torch.randn(out, generator=gen).to(dtype).contiguous(memory_format=torch.channels_last)
    leaves = [t for t in (x, x2, bn.weight, bn.bias) if t is not None]
    if bn2 is not None:
        leaves += [bn2.weight, bn2.bias]

    def step(fused: bool) -> None:
        for t in leaves:
            t.grad = None
        if fused:
            y = fused_norm.norm_act(x, bn, act, 0.1, pool, (x2, bn2) if two else None)
        else:
            y = aten(x, bn, act, x2, bn2, pool)
        y.backward(dy)

    for fused in (False, True):  # warm-up
        step(fused)
    times: dict[bool, list[float]] = {False: [], True: []}
    clones = []
    for r in range(rounds):
        for fused in (False, True) if r % 2 == 0 else (True, False):
            times[fused].append(timed(lambda f=fused: step(f), calls))
        clones.append(timed(lambda: x.detach().clone(), calls))
    return statistics.median(clones), statistics.median(times[False]), statistics.median(times[True])


if __name__ == "__main__":
    main()
