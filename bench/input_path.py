"""Where the CPU input path's augmentation runs, measured end to end.

    python bench/input_path.py [--cub-root data/CUB_200_2011] [--backbone conv4]
        [--precision bf16] [--rounds 4] [--steps 30] [--loaded]

Each variant trains in a process of its own (its own thread teams and allocator):

  model       the step on a batch already in memory (the ceiling);
  now         the loader as training uses it: crops cut in a background thread, the
              augmentation on (B, C, H, W) planes where ``loader.Placement`` finds it
              faster — in the training thread or in the background thread too;
  before      the path before: the whole batch (cut + augment) made in a background
              thread, the colour jitter on channels-last tensors;
  inline      ``now`` held in the training thread;
  background  ``now`` held in the background thread (so ``background``/``before`` is the
              layout's part alone).

The variants step in blocks of ``--steps``, one process at a time and the others idle,
in turn, ``--rounds`` times (the order rotating each round). Steps are not interleaved
one by one as in train_speed.py: there a variant's background thread would work while
the other process steps and steal its cores, which is what is being measured. The first
3 steps of each block are not timed (the batches the idle process had queued). Prints
each variant's img/s (median over rounds of its block rates) and its ratio to
``before`` (median over rounds of the same round's ratio). All variants produce the same
batches; the bench checks that on the first two before timing.

``--loaded``: a second process keeps one core busy throughout (``common.CpuBurner``), as
on a machine shared with other work.

Data: the CUB train split (``--cub-root``, the layout of docs/cub.md) or, without it,
generated CUB-sized JPEGs (``common.make_jpegs``).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import multiprocessing
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import CpuBurner, make_jpegs, train_step  # noqa: E402

from negmargin.augment import color_jitter, normalize  # noqa: E402
from negmargin.config import Config  # noqa: E402
from negmargin.datasets import load_split  # noqa: E402
from negmargin.loader import Placement, TrainLoader  # noqa: E402
from negmargin.model import build_model  # noqa: E402
from negmargin.resample import crop_resize_each  # noqa: E402
from negmargin.runtime import Runtime, cpu_info, retain_freed_memory  # noqa: E402

VARIANTS = ("model", "now", "before", "inline", "background")


def finish_channels_last(loader: TrainLoader, item: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``TrainLoader.finish`` as it was before: the jitter on the channels-last resize output."""
    cfg, p = loader.cfg, item["params"]
    size = cfg.data.image_size
    x = crop_resize_each(item["pixels"], item["hw"], size, size, cfg.augment.interpolation)
    if p.flip.any():
        flip = torch.from_numpy(p.flip)
        x[flip] = x[flip].flip(-1)
    x = color_jitter(x.float(), torch.from_numpy(p.jitter), torch.from_numpy(p.order))
    x = normalize(x, cfg.data.mean, cfg.data.std).contiguous(memory_format=torch.channels_last)
    return x, item["labels"]


class Held(Placement):
    """A placement that never probes: the augmentation always in line or always in the background."""

    def __init__(self, lag: int, in_background: bool) -> None:
        super().__init__(lag)
        self.in_background = in_background

    def choose(self, iteration: int) -> bool:
        return self.in_background

    def record(self, iteration: int, in_background: bool, seconds: float) -> None:
        pass  # nothing to decide


def make_batches(variant: str, loader: TrainLoader):
    """The loader itself, its placement held for every variant but ``now``; ``before`` also
    with the old channels-last ``finish``."""
    if variant != "now":
        loader.placement = Held(loader.depth, in_background=variant in ("before", "background"))
    if variant == "before":
        loader.finish = functools.partial(finish_channels_last, loader)  # type: ignore[method-assign]
    return (b[:2] for e in range(10**9) for b in loader.epoch(e))


def worker(conn, cfg_raw: dict, num_classes: int, variant: str) -> None:
    """One variant in its own process: answers each block request with its step times."""
    retain_freed_memory(True)
    cfg = Config.from_dict(cfg_raw).validate()
    rt = Runtime(torch.device("cpu"), cfg.train.precision, True)
    torch.manual_seed(0)
    model = build_model(cfg, num_classes).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    step = functools.partial(train_step, model, opt, rt)
    if variant == "model":
        fixed = torch.randn(64, 3, 84, 84).contiguous(memory_format=torch.channels_last)
        stream = iter(lambda: (fixed, torch.arange(64) % num_classes), None)
    else:
        packed = load_split(cfg, "train", progress=False, log=lambda _: None)
        stream = make_batches(variant, TrainLoader(packed, cfg, 64, rt.device))
    while (n := conn.recv()) is not None:
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            step(*next(stream))
            times.append(time.perf_counter() - t0)
        conn.send(times)


def check_same_batches(cfg: Config, packed) -> None:
    loader = TrainLoader(packed, cfg, 64, torch.device("cpu"))
    indices = loader.sampler.indices(0)
    for it in range(2):
        item = loader.prepare(0, it, indices)
        now, _ = loader.finish(item)
        old, _ = finish_channels_last(loader, item)
        if not torch.equal(now, old):
            raise SystemExit(f"batch {it}: the two layouts give different pixels — the comparison is void")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cub-root", help="CUB_200_2011 folder (docs/cub.md); default: generated JPEGs")
    parser.add_argument("--backbone", default="conv4", choices=["conv4", "resnet12"])
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=30, help="steps per block (3 of them untimed)")
    parser.add_argument("--loaded", action="store_true", help="one core kept busy by another process")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="negmargin-bench-"))
    if args.cub_root:
        data = {"dataset": "cub", "root": args.cub_root}
        what = f"CUB train split ({args.cub_root})"
    else:
        make_jpegs(tmp / "jpegs", 8, 60)
        data = {"dataset": "folder", "root": str(tmp / "jpegs"), "cache_dir": str(tmp / "cache"),
                "options": {"split_fractions": (1, 0, 0)}}  # fmt: skip
        what = "generated JPEGs ~500×375"
    raw = {"name": "bench", "data": data, "model": {"backbone": args.backbone},
           "train": {"device": "cpu", "precision": args.precision, "workers": 1}}  # fmt: skip
    cfg = Config.from_dict(raw).validate()
    packed = load_split(cfg, "train", progress=False)
    check_same_batches(cfg, packed)
    print(f"torch {torch.__version__}, {cpu_info()[0]}, {torch.get_num_threads()} threads; {what}; "
          f"{args.backbone} {args.precision} channels-last, batch 64; the variants' batches are bit-identical")  # fmt: skip

    ctx = multiprocessing.get_context("spawn")
    conns, procs = {}, []
    for v in args.variants:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=worker, args=(child, cfg.to_dict(), packed.num_classes, v))
        proc.start()
        conns[v], procs = parent, [*procs, proc]
    rates: dict[str, list[float]] = {v: [] for v in args.variants}
    burner = CpuBurner() if args.loaded else contextlib.nullcontext()
    try:
        with burner:
            for r in range(args.rounds):
                order = args.variants[r % len(args.variants) :] + args.variants[: r % len(args.variants)]
                for v in order:
                    conns[v].send(args.steps)
                    times = conns[v].recv()[3:]
                    rates[v].append(64 * len(times) / sum(times))
                line = ", ".join(f"{v} {rates[v][-1]:.1f}" for v in args.variants)
                print(f"round {r + 1}: {line}", flush=True)
    finally:
        for conn in conns.values():
            conn.send(None)
        for proc in procs:
            proc.join()
    print(f"{'variant':<8} {'img/s':>8} {'/ before':>9}")
    for v in args.variants:
        ratio = ""
        if "before" in rates:
            ratio = f"{statistics.median(a / b for a, b in zip(rates[v], rates['before'])):>9.3f}"
        print(f"{v:<8} {statistics.median(rates[v]):>8.1f} {ratio}")
    print(
        f"({args.rounds} rounds of {args.steps - 3} timed steps per variant; median over rounds"
        + ("; one core kept busy" if args.loaded else "")
        + ")"
    )


if __name__ == "__main__":
    main()
