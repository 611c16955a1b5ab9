"""Training throughput: model alone vs our input path vs a per-image PIL pipeline.

    python bench/train_speed.py [--backbones conv4 resnet12] [--steps 12] [--device cpu]
        [--data-root ../shared/data/mini_imagenet]   # real miniImageNet instead of generated JPEGs

For each backbone at batch 64, 84×84, and each precision (fp32; bf16 autocast +
channels-last), in one run:

  (1) model only: forward + backward + SGD step on a batch already in memory;
  (2) our input path: packed uint8 cache (CUB-like ~500×375 JPEGs stored at short
      side 256) → crops cut by a background thread → RandomResizedCrop + flip +
      ColorJitter + normalise batched on the device → the same step;
  (3) the usual pipeline: torch DataLoader with worker processes, each decoding
      the JPEG and applying the same augmentation per image with PIL → the same step.

and (1) and (2) again as training ran before #29's changes — "before" below, with
``--before``: ``all`` (default) both changes, ``order`` Conv4's blocks in the order they had
before pooling moved ahead of the ReLU, ``malloc`` glibc's default malloc instead of
``train.cpu_malloc="retain"`` (both changes give bit-identical results), ``fused`` ATen's
batch norm, activation and pooling instead of the fused kernel (``--fused-norm`` trains "now"
with ``train.fused_norm=True``; the same computation, other roundings). Now and before
each run in a process of their own (the allocator's state is per process) and alternate
step by step (the first of each pair alternating too), so that both see the same machine:
its speed here drifts by ±20% over minutes, more than the difference measured.
now/before is the median of the paired step-time ratios. (3) runs in this process, with
the allocator set as training sets it.

Prints images/s for each, the ratios (2)/(1), (2)/(3) and now/before, and the share of the machine's
arithmetic bound that (1) and (2) reach (``bound.py``: FLOP per image counted, peak FLOP/s
from the CPU's flags, cores and clock; printed in the header). The machine is
shared and noisy: every number of a table comes from the same run; each rate
is images over wall time of consecutive steps (waiting for data included) after
warm-up steps.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import math
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageEnhance

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bound import clock_ghz, cores, peak_flops, training_flops_per_image  # noqa: E402
from common import make_jpegs, our_batches, timed_steps, train_step  # noqa: E402

from negmargin import fused_norm  # noqa: E402
from negmargin.augment import sample_params  # noqa: E402
from negmargin.config import Config  # noqa: E402
from negmargin.datasets import load_split  # noqa: E402
from negmargin.loader import TrainLoader  # noqa: E402
from negmargin.model import FewShotModel, build_model  # noqa: E402
from negmargin.runtime import Runtime, cpu_info, native_bf16, retain_freed_memory  # noqa: E402


class PILDataset(torch.utils.data.Dataset):
    """Per image: decode the JPEG, then RandomResizedCrop/flip/ColorJitter with PIL."""

    def __init__(self, paths, labels, cfg: Config):
        self.paths, self.labels, self.cfg = paths, labels, cfg
        self.mean = torch.tensor(cfg.data.mean).view(3, 1, 1)
        self.std = torch.tensor(cfg.data.std).view(3, 1, 1)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        img = Image.open(self.paths[i]).convert("RGB")
        rng = np.random.default_rng([os.getpid(), i, time.perf_counter_ns()])
        p = sample_params(rng, np.array([img.height]), np.array([img.width]), self.cfg.augment)
        t, left, h, w = p.boxes[0]
        img = img.crop((left, t, left + w, t + h)).resize((84, 84), Image.BILINEAR)
        if p.flip[0]:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        ops = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)
        for op in p.order[0]:
            img = ops[op](img).enhance(float(p.jitter[0][op]))
        x = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1)
        return (x - self.mean) / self.std, self.labels[i]


def activation_before_pool(model: FewShotModel) -> FewShotModel:
    """The Conv4 block order before #29 (Conv → BN → ReLU → MaxPool), same modules, in place."""
    for block in model.backbone.layers:
        conv, bn, pool, relu = block.layers
        block.layers = torch.nn.Sequential(conv, bn, relu, pool)
    return model


def make_step(cfg: Config, num_classes: int, rt: Runtime, before: bool):
    """A fresh model (seed 0) and its training step; ``before``: the pre-#29 block order."""
    torch.manual_seed(0)
    model = build_model(cfg, num_classes).to(rt.device)
    if before:
        activation_before_pool(model)
    if rt.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.train.fused_norm:
        fused, note = fused_norm.enable(model.backbone, rt.device)
        if not fused:
            raise SystemExit(note)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    return model, functools.partial(train_step, model, opt, rt)


def variant_worker(
    conn, cfg_raw: dict, num_classes: int, device: str, before_order: bool, retain: bool
) -> None:
    """One variant's training step in a process of its own, stepping when told.

    Receives "memory" (a step on a fixed batch) or "ours" (a step on our input path's
    next batch) and answers with the step's wall time; None ends it."""
    if retain:
        retain_freed_memory(True)
    cfg = Config.from_dict(cfg_raw).validate()
    rt = Runtime(torch.device(device), cfg.train.precision, cfg.train.channels_last == "on")
    _, step = make_step(cfg, num_classes, rt, before=before_order)
    fixed = torch.randn(64, 3, 84, 84, generator=torch.Generator().manual_seed(0))
    fixed = (
        fixed.to(rt.device).contiguous(memory_format=rt.memory_format),
        torch.arange(64).to(rt.device) % num_classes,
    )
    ours = None
    while (what := conn.recv()) is not None:
        if what == "ours" and ours is None:
            packed = load_split(cfg, "train", progress=False, log=lambda _: None)  # the parent said it
            ours = our_batches(TrainLoader(packed, cfg, 64, rt.device, channels_last=rt.channels_last))
        t0 = time.perf_counter()
        step(*(fixed if what == "memory" else next(ours)))
        conn.send(time.perf_counter() - t0)


def paired_steps(workers: dict, what: str, warmup: int, steps: int, batch_size: int = 64) -> dict:
    """Steps of the variants ``{"now": conn, "before": conn}`` (pipes to ``variant_worker``
    processes) alternated one by one, on ``what`` ("memory" or "ours").

    Returns each one's images/s over its own steps (data waits included) and ``ratio``:
    the median over the pairs of before's step time / now's."""
    times: dict[str, list[float]] = {k: [] for k in workers}
    for i in range(warmup + steps):
        for k in workers if i % 2 == 0 else reversed(list(workers)):
            workers[k].send(what)
            dt = workers[k].recv()
            if i >= warmup:
                times[k].append(dt)
    out = {k: batch_size * len(v) / sum(v) for k, v in times.items()}
    out["ratio"] = statistics.median(b / a for a, b in zip(times["now"], times["before"]))
    return out


def start_workers(cfg_raw: dict, num_classes: int, device: str, name: str, before: str) -> tuple[dict, list]:
    """The now and before variants' processes (spawned: a fresh allocator each)."""
    ctx = multiprocessing.get_context("spawn")
    unfused = {**cfg_raw, "train": {**cfg_raw["train"], "fused_norm": False}}
    specs = {
        "now": (cfg_raw, False, True),
        "before": (
            unfused if before == "fused" else cfg_raw,
            before in ("all", "order") and name == "conv4",
            before in ("order", "fused"),
        ),
    }
    conns, procs = {}, []
    for k, (raw, before_order, retain) in specs.items():
        parent, child = ctx.Pipe()
        proc = ctx.Process(
            target=variant_worker, args=(child, raw, num_classes, device, before_order, retain)
        )
        proc.start()
        conns[k] = parent
        procs.append(proc)
    return conns, procs


def dataloader_batches(dl, memory_format):
    while True:
        for x, y in dl:
            yield x.contiguous(memory_format=memory_format), y


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backbones", nargs="+", default=["conv4", "resnet12"])
    parser.add_argument(
        "--steps", type=int, default=30, help="timed steps per measurement (ResNet12: a third)"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes for (3)")
    parser.add_argument("--compile", action="store_true", help="also time (1) with torch.compile")
    parser.add_argument(
        "--data-root", help="real miniImageNet (train.csv + images/) instead of generated JPEGs"
    )
    parser.add_argument("--cache-dir", help="data.cache_dir for --data-root")
    parser.add_argument(
        "--precisions",
        nargs="+",
        choices=["fp32", "fp32+CL", "bf16+CL"],
        default=["fp32", "bf16+CL"],
        help="CL = channels-last; bf16 is emulated (~6x slower) on CPUs without native bf16",
    )
    parser.add_argument(
        "--before",
        choices=["all", "order", "malloc", "fused"],
        default="all",
        help="what 'before' undoes: both of #29's first changes, Conv4's block order, the allocator, "
        "or the fused batch-norm kernel (with --fused-norm)",
    )
    parser.add_argument(
        "--fused-norm", action="store_true", help="train 'now' and (3) with train.fused_norm=True"
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        retain_freed_memory(True)  # as training sets it, for (3)
    tmp = Path(tempfile.mkdtemp(prefix="negmargin-bench-"))
    if args.data_root:
        root = Path(args.data_root)
        data = {
            "dataset": "mini_imagenet",
            "root": str(root),
            "cache_dir": args.cache_dir or str(tmp / "cache"),
        }
        paths = [
            str(root / "images" / line.split(",")[0])
            for line in (root / "train.csv").read_text().splitlines()[1:]
        ]
        what = "real miniImageNet train split (84×84 JPEGs)"
    else:
        make_jpegs(tmp / "jpegs", 8, 60)
        data = {
            "dataset": "folder",
            "root": str(tmp / "jpegs"),
            "cache_dir": str(tmp / "cache"),
            "options": {"split_fractions": (1, 0, 0)},
        }
        paths = [str(p) for p in sorted((tmp / "jpegs").rglob("*.jpg"))]
        what = "JPEGs ~500×375 stored at short side 256"
    base = {"name": "bench", "data": data, "train": {"device": str(device), "workers": 1}}
    cfg = Config.from_dict(base).validate()
    packed = load_split(cfg, "train", progress=False)
    labels = torch.from_numpy(packed.labels)
    model_name, flags = cpu_info()
    print(
        f"torch {torch.__version__} on {device} ({model_name}; native bf16: {native_bf16(flags)}; "
        f"{torch.get_num_threads()} threads); {len(packed)} images: {what}; batch 64, 84×84"
    )
    ghz = clock_ghz()
    if device.type == "cpu" and ghz:
        for prec in sorted({"bf16" if p.startswith("bf16") else "fp32" for p in args.precisions}):
            print(f"bound, {prec}: {peak_flops(flags, prec, cores(), ghz)[1]}")
    print(
        f"{'backbone':<9} {'precision':<16} {'(1) model':>10} {'(2) ours':>10} {'(3) PIL+DL':>11} "
        f"{'(2)/(1)':>8} {'(2)/(3)':>8} {'(1),(2) of bound':>17}   "
        f"{'(1) before':>10} {'(2) before':>10} {'(1),(2) now/before':>18}"
    )
    for name in args.backbones:
        for precision in args.precisions:
            bf16, cl = precision.startswith("bf16"), precision.endswith("+CL")
            run_cfg = Config.from_dict(
                {
                    **base,
                    "model": {"backbone": name},
                    "train": {
                        **base["train"],
                        "precision": "bf16" if bf16 else "fp32",
                        "channels_last": "on" if cl else "off",
                        "fused_norm": args.fused_norm,
                    },
                }
            ).validate()
            rt = Runtime(device, "bf16" if bf16 else "fp32", cl)

            model, step = make_step(run_cfg, packed.num_classes, rt, before=False)
            steps = args.steps if name == "conv4" else max(3, args.steps // 3)
            warm = 2
            fmt = torch.channels_last if cl else torch.contiguous_format
            fixed = torch.randn(64, 3, 84, 84, device=device).contiguous(memory_format=fmt)
            fixed_y = labels[:64].to(device)
            changed = name == "conv4" or args.before != "order"
            if args.before == "fused" and not args.fused_norm:
                raise SystemExit("--before fused compares with the fused kernel: add --fused-norm")
            workers, procs = start_workers(
                run_cfg.to_dict(), packed.num_classes, str(device), name, args.before
            )
            try:
                p1 = paired_steps(workers, "memory", warm, steps)
                p2 = paired_steps(workers, "ours", warm, steps)
            finally:
                for conn in workers.values():
                    conn.send(None)
                for proc in procs:
                    proc.join()
            r1, r2 = p1["now"], p2["now"]
            dl = torch.utils.data.DataLoader(
                PILDataset(paths, labels, run_cfg),
                batch_size=64,
                shuffle=True,
                num_workers=args.workers,
                persistent_workers=True,
                drop_last=True,
                prefetch_factor=2,
            )

            r3 = timed_steps(step, dataloader_batches(dl, fmt), warm, steps)
            share = ""
            if device.type == "cpu" and ghz:
                peak, _ = peak_flops(flags, "bf16" if bf16 else "fp32", cores(), ghz)
                per_image = training_flops_per_image(model, 84, packed.num_classes)
                share = f"{r1 * per_image / peak:>8.0%} {r2 * per_image / peak:>8.0%}"
            before = "   —  (no change in this backbone)"
            if changed:
                b1, b2 = p1["before"], p2["before"]
                before = f"{b1:>8.1f}/s {b2:>8.1f}/s {p1['ratio']:>9.2f} {p2['ratio']:>8.2f}"
            print(
                f"{name:<9} {precision:<16} {r1:>8.1f}/s {r2:>8.1f}/s {r3:>9.1f}/s {r2 / r1:>8.2f} {r2 / r3:>8.2f} {share}   {before}"
            )
            if args.compile and name == "conv4":
                cmodel = build_model(run_cfg, packed.num_classes).to(device)
                if cl:
                    cmodel = cmodel.to(memory_format=torch.channels_last)
                cmodel.backbone.compile()
                copt = torch.optim.SGD(cmodel.parameters(), lr=0.01)

                cstep = functools.partial(train_step, cmodel, copt, rt)
                t0 = time.perf_counter()
                cstep(fixed, fixed_y)
                first = time.perf_counter() - t0
                rc = timed_steps(cstep, itertools.repeat((fixed, fixed_y)), 2, steps)
                print(
                    f"{'':<9} {'+torch.compile':<16} {rc:>8.1f}/s   (model only; first step {first:.0f} s; "
                    f"×{rc / r1:.2f} vs eager)"
                )
    print(
        f"({args.steps} timed steps, ResNet12 {max(3, args.steps // 3)}, after 2 warm-up steps; "
        f"before = {args.before}; fused norm {'on' if args.fused_norm else 'off'} in 'now'; now/before: alternating steps, median of the paired step-time ratios; "
        f"{math.ceil(len(packed) / 64)} batches per epoch)"
    )


if __name__ == "__main__":
    main()
