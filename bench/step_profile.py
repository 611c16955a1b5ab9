"""Where a training step's time goes, by operator: the profile behind docs/benchmarks.md.

    python bench/step_profile.py [--backbone conv4] [--precision fp32] [--steps 5]
        [--before] [--malloc system] [--by-shape] [--fused-norm [--versus-aten R]]

Model only (forward + cross-entropy on a linear head + backward + SGD), batch 64,
84×84, channels-last, random data, after 3 warm-up steps; PyTorch's profiler over
``--steps`` steps. Prints the step time and the operators by self CPU time.
``--before`` times Conv4 with its blocks in the order they had before #29 (ReLU
before max pooling; bit-identical results), ``--malloc system`` with glibc's default
malloc instead of training's ``train.cpu_malloc="retain"`` (the kernel's page faults then
add system time that the operator table does not show), ``--by-shape`` splits each
operator by its input shapes (which layer it is), ``--fused-norm`` trains the blocks through
the fused batch-norm kernel (``train.fused_norm``); with ``--versus-aten R`` it first runs R
rounds in which blocks of ``--steps`` steps with the kernel and with ATen's layers take turns
(the same model and batch) and prints each one's median ms/step and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from negmargin import fused_norm  # noqa: E402
from negmargin.backbones import build_backbone  # noqa: E402
from negmargin.runtime import cpu_info, retain_freed_memory  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backbone", default="conv4")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--before", action="store_true", help="Conv4: ReLU before pooling")
    parser.add_argument("--malloc", choices=["retain", "system"], default="retain")
    parser.add_argument("--by-shape", action="store_true")
    parser.add_argument("--fused-norm", action="store_true")
    parser.add_argument("--versus-aten", type=int, default=0, metavar="R", help="with --fused-norm")
    parser.add_argument("--rows", type=int, default=15)
    args = parser.parse_args()
    if args.malloc == "retain":
        retain_freed_memory(True)  # as a training run sets it
    torch.manual_seed(0)
    backbone = build_backbone(args.backbone)
    if args.before:
        for block in backbone.layers:
            conv, bn, pool, relu = block.layers
            block.layers = torch.nn.Sequential(conv, bn, relu, pool)
    backbone = backbone.to(memory_format=torch.channels_last)
    if args.fused_norm:
        fused, note = fused_norm.enable(backbone, torch.device("cpu"))
        if not fused:
            raise SystemExit(note)
    head = torch.nn.Linear(backbone.num_features, 100, bias=False)
    params = [*backbone.parameters(), *head.parameters()]
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(64, 3, 84, 84).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 100, (64,))

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            logits = head(backbone(x))
        F.cross_entropy(logits.float(), y).backward()
        opt.step()

    for _ in range(3):
        step()
    if args.fused_norm and args.versus_aten:
        versus_aten(backbone, step, args.steps, args.versus_aten, f"{args.backbone} {args.precision}")
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    dt = (time.perf_counter() - t0) / args.steps
    print(
        f"{args.backbone} {args.precision} channels-last{' (ReLU before pool)' if args.before else ''}"
        f"{', fused norm' if args.fused_norm else ''}, "
        f"malloc {args.malloc} "
        f"on {cpu_info()[0]}, {torch.get_num_threads()} threads: {dt * 1000:.0f} ms/step, {64 / dt:.1f} img/s"
    )
    with profile(activities=[ProfilerActivity.CPU], record_shapes=args.by_shape) as prof:
        for _ in range(args.steps):
            step()
    table = prof.key_averages(group_by_input_shape=args.by_shape).table(
        sort_by="self_cpu_time_total",
        row_limit=args.rows,
        max_name_column_width=45,
        max_shapes_column_width=60,
    )
    print(table)


def versus_aten(backbone, step, steps: int, rounds: int, what: str) -> None:
    """Blocks of ``steps`` steps with the fused kernel and with ATen's layers, taking turns."""
    times: dict[bool, list[float]] = {True: [], False: []}
    for r in range(rounds):
        for fused in (True, False) if r % 2 else (False, True):
            backbone.fuse_norms(fused)
            step()  # the first step after a switch is not timed
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            times[fused].append((time.perf_counter() - t0) / steps)
    backbone.fuse_norms(True)
    f, a = statistics.median(times[True]), statistics.median(times[False])
    print(
        f"{what}, {rounds} rounds of {steps} steps each way: fused {f * 1000:.1f} ms/step ({64 / f:.1f} img/s), "
        f"ATen's layers {a * 1000:.1f} ms/step ({64 / a:.1f} img/s); ×{a / f:.2f}"
    )


if __name__ == "__main__":
    main()
