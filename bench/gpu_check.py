"""The GPU check: everything CUDA-specific measured in one short run, one table, one JSON file.

    python bench/gpu_check.py [--data-root DATA/mini_imagenet] [--out gpu_check.json]
    python bench/gpu_check.py --smoke          # CPU, tiny sizes, seconds: what CI runs

Every CUDA path is measured in one short run, start to finish in at most ~8 minutes on one
GPU, so that a few minutes on a GPU machine are enough:

1. **throughput** — Conv4 and ResNet12 at 84×84, batch 64, fp32 and bf16 (+
   channels-last): (1) the model alone on a batch in memory, (2) the project's full
   input path (packed cache → crops cut by ``train.workers`` background threads →
   batched crop/resize/flip/jitter kernels on the device → the same step), on real
   miniImageNet when ``--data-root`` has it, else on generated images; (2)/(1) per row
   (goal on a GPU: ≥ 0.8 for Conv4) and the peak GPU memory of each row;
2. **schedule** — a few hundred iterations of the real Conv4 miniImageNet config
   through ``negmargin.train.run`` at full speed, and from the measured iteration and
   validation times the projected wall time of the full 200-epoch schedule;
3. **meta-test** — 2000 5-way 1-shot and 5-shot episodes at 1600-d and 640-d on the
   device: seconds each, and the accuracy against the CPU engine on the same features;
4. **correctness** — the batched augmentation on the device against the CPU path
   (the tolerance of tests/test_augment.py); a short run SIGKILLed and resumed on the
   device against an uninterrupted one (bit-exact, or the largest weight difference
   when the device's kernels are not deterministic); ``torchrun --nproc_per_node=1``
   (NCCL on a GPU) trains and meta-tests.

Without a GPU every row is still run, on the CPU at tiny sizes with ``--smoke`` (so
the script cannot rot between GPU runs), and the table says that no GPU row was
measured. Exit status 1 if a correctness row fails.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from common import make_jpegs, our_batches, timed_steps, train_step  # noqa: E402

from negmargin.augment import sample_params, train_batch  # noqa: E402
from negmargin.config import AugmentConfig, Config, load_config  # noqa: E402
from negmargin.datasets import load_split  # noqa: E402
from negmargin.datasets.demo import generate  # noqa: E402
from negmargin.episodes import sample_episodes  # noqa: E402
from negmargin.finetune import FinetuneConfig  # noqa: E402
from negmargin.loader import TrainLoader  # noqa: E402
from negmargin.meta_test import run_episodes  # noqa: E402
from negmargin.model import build_model  # noqa: E402
from negmargin.runtime import Runtime  # noqa: E402
from negmargin.testing import tiny_raw, write_config  # noqa: E402
from negmargin.train import run  # noqa: E402

MINI_CONFIG = (
    REPO
    / "configs/classification/neg_margin/mini_imagenet/neg-margin_cosine_conv4_1xb64_mini-imagenet_5way-1shot.py"
)
TRAIN = str(REPO / "tools/classification/train.py")
TEST = str(REPO / "tools/classification/test.py")


class Table:
    """Rows of (section, name, value, unit, note); printed at the end and written as JSON."""

    def __init__(self) -> None:
        self.rows: list[dict] = []
        self.failed: list[str] = []

    def add(
        self, section: str, name: str, value, unit: str = "", note: str = "", ok: bool | None = None
    ) -> None:
        row = {"section": section, "name": name, "value": value, "unit": unit, "note": note}
        if ok is not None:
            row["ok"] = ok = bool(ok)
            if not ok:
                self.failed.append(f"{section}: {name}")
        self.rows.append(row)
        print(f"  {section:<12} {name:<52} {_fmt(value):>12} {unit:<8} {note}", flush=True)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def data_config(args, tmp: Path, device: torch.device, smoke: bool) -> tuple[Config, str]:
    """The throughput rows' data: real miniImageNet if present, else generated JPEGs."""
    base = {
        "name": "gpu_check",
        "data": {"cache_dir": str(tmp / "cache"), "image_size": 84},
        "train": {"device": str(device), "workers": args.workers},
    }
    if args.data_root and (Path(args.data_root) / "train.csv").is_file() and not smoke:
        base["data"].update(dataset="mini_imagenet", root=args.data_root)
        what = f"real miniImageNet train split ({args.data_root})"
    else:
        make_jpegs(tmp / "jpegs", 4 if smoke else 16, 16 if smoke else 60)
        base["data"].update(dataset="folder", root=str(tmp / "jpegs"), options={"split_fractions": (1, 0, 0)})
        what = "generated ~500×375 JPEGs (no --data-root with miniImageNet)"
    return Config.from_dict(base).validate(), what


def throughput(args, table: Table, device: torch.device, tmp: Path, smoke: bool) -> None:
    cfg, what = data_config(args, tmp, device, smoke)
    t0 = time.perf_counter()
    packed = load_split(cfg, "train", progress=False, log=lambda m: None)
    table.add(
        "throughput",
        "input: " + what,
        len(packed),
        "images",
        f"cache ready in {time.perf_counter() - t0:.0f} s",
    )
    batch = 8 if smoke else 64
    labels = torch.from_numpy(packed.labels)
    for name in ("conv4", "resnet12"):
        for precision in ("fp32", "bf16"):
            bf16 = precision == "bf16"
            run_cfg = replace(
                cfg,
                model=replace(cfg.model, backbone=name),
                train=replace(cfg.train, precision=precision, channels_last="on" if bf16 else "off"),
                data=replace(cfg.data, image_size=32 if smoke else 84),
            ).validate()
            torch.manual_seed(0)
            reset_peak(device)
            model = build_model(run_cfg, packed.num_classes).to(device)
            if bf16:
                model = model.to(memory_format=torch.channels_last)
            rt = Runtime(device, precision, bf16)
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
            step = functools.partial(train_step, model, opt, rt)
            steps = 2 if smoke else (args.steps if name == "conv4" else max(10, args.steps // 4))
            size = run_cfg.data.image_size
            fmt = torch.channels_last if bf16 else torch.contiguous_format
            fixed = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=fmt)
            fixed_y = labels[:batch].to(device)
            r1 = timed_steps(step, itertools.repeat((fixed, fixed_y)), 3, steps, batch)
            loader = TrainLoader(packed, run_cfg, batch, device, channels_last=bf16)
            r2 = timed_steps(step, our_batches(loader), 3, steps, batch)
            mem = peak_gib(device)
            table.add(
                "throughput",
                f"{name} {precision}{' + channels-last' if bf16 else ''}: (1) model only",
                round(r1, 1),
                "img/s",
            )
            table.add(
                "throughput",
                f"{name} {precision}{' + channels-last' if bf16 else ''}: (2) our input path",
                round(r2, 1),
                "img/s",
                f"(2)/(1) = {r2 / r1:.2f}" + (f"; peak GPU memory {mem:.2f} GiB" if mem is not None else ""),
            )


def schedule(args, table: Table, device: torch.device, tmp: Path, smoke: bool) -> None:
    """Iterations of the real Conv4 miniImageNet config through train.run; 200-epoch projection."""
    real = args.data_root and (Path(args.data_root) / "train.csv").is_file() and not smoke
    iters = 3 if smoke else args.schedule_iters
    overrides = [
        "train.epochs=1",
        f"train.max_iters_per_epoch={iters}",
        f"train.device='{device}'",
        f"train.workers={args.workers}",
        "train.log_interval=10" if not smoke else "train.log_interval=1",
    ]
    if real:
        overrides += [f"data.root='{args.data_root}'", f"data.cache_dir='{tmp / 'cache'}'"]
        what = "real miniImageNet"
    else:
        root = generate(
            tmp / "demo", n_classes=30, n_images=20 if smoke else 60, split_sizes=(20, 5, 5), progress=False
        )
        overrides += [
            "data.dataset='folder'",
            f"data.root='{root}'",
            f"data.cache_dir='{tmp / 'cache'}'",
            "model.num_classes=None",
        ]
        what = "generated images (no --data-root with miniImageNet)"
        if smoke:
            overrides += ["data.image_size=32", "train.batch_size=8", "val.n_episodes=4", "val.n_query=3"]
    full = load_config(MINI_CONFIG)
    cfg = load_config(MINI_CONFIG, overrides)
    wd = tmp / "schedule"
    run(cfg, wd, progress=False)
    entries = [json.loads(line) for p in wd.glob("*.log.json") for line in p.read_text().splitlines()]
    times = [e["time"] for e in entries if e.get("mode") == "train" and e.get("time")]
    vals = [e["seconds"] for e in entries if e.get("mode") == "val" and e.get("seconds")]
    per_iter = statistics.median(times)
    per_epoch_iters = 600  # 38,400 images / 64 (the config's full epoch)
    vals_per_run = full.train.epochs // full.val.interval
    projected = full.train.epochs * per_epoch_iters * per_iter + vals_per_run * (vals[0] if vals else 0.0)
    precision = cfg.train.precision  # the config's own: fp32, as the reference trains
    table.add(
        "schedule",
        f"Conv4 mini config, {iters} iterations ({what}), {precision}",
        round(cfg.train.batch_size / per_iter, 1),
        "img/s",
        f"median iteration {per_iter * 1000:.1f} ms; validation (100 episodes) {vals[0] if vals else 0:.1f} s",
    )
    table.add(
        "schedule",
        f"projected full schedule: {full.train.epochs} epochs × {per_epoch_iters} it + {vals_per_run} validations",
        round(projected / 60, 1),
        "min",
        "from the measured rates above" + (" (smoke sizes: not a real projection)" if smoke else ""),
    )


def meta_test_rows(args, table: Table, device: torch.device, smoke: bool) -> None:
    n_episodes = 40 if smoke else 2000
    labels = np.repeat(np.arange(20), 600)
    for dim in (1600, 640):
        torch.manual_seed(dim)
        feats = torch.relu(torch.randn(len(labels), dim))
        for shot in (1, 5):
            s, steps = FinetuneConfig(), ((150 if shot == 1 else 600) if not smoke else 10)
            episodes = sample_episodes(labels, 5, shot, 15, n_episodes, seed=0)
            ids = torch.arange(n_episodes)
            on_device = feats.to(device)
            run_episodes(on_device, episodes[:8], ids[:8], shot, s, steps)  # warm-up (kernels, allocator)
            sync(device)
            reset_peak(device)
            t0 = time.perf_counter()
            accs = run_episodes(on_device, episodes, ids, shot, s, steps)
            sync(device)
            seconds = time.perf_counter() - t0
            t0 = time.perf_counter()
            cpu = run_episodes(feats, episodes, ids, shot, s, steps)
            cpu_seconds = time.perf_counter() - t0
            differ = int((np.abs(accs - cpu) > 1e-9).sum())
            mem = peak_gib(device)
            table.add(
                "meta-test",
                f"{n_episodes} 5-way {shot}-shot episodes, {dim}-d, {steps} steps on {device.type}",
                round(seconds, 3),
                "s",
                f"CPU engine {cpu_seconds:.2f} s; accuracy {accs.mean():.2f} vs CPU {cpu.mean():.2f} "
                f"({differ} episodes differ)"
                + (f"; peak GPU memory {mem:.2f} GiB" if mem is not None else ""),
                ok=abs(accs.mean() - cpu.mean()) < 0.05,
            )


def augmentation_row(table: Table, device: torch.device) -> None:
    """The batched augmentation on the device against the CPU per-sample path."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:375, 0:500] / 500
    images = [
        np.clip(
            np.stack(
                [127 + 90 * np.sin(7 * xx * (k + 1) + 5 * yy + rng.uniform(0, 6)) for k in range(3)], -1
            ),
            0,
            255,
        ).astype(np.uint8)[: 375 - 40 * i, : 500 - 60 * i]
        for i in range(4)
    ] * 16
    cfg = AugmentConfig()
    params = sample_params(
        np.random.default_rng(5),
        np.array([im.shape[0] for im in images]),
        np.array([im.shape[1] for im in images]),
        cfg,
    )
    hw = params.boxes[:, 2:]
    crops = np.zeros((len(images), hw[:, 0].max(), hw[:, 1].max(), 3), dtype=np.uint8)
    for i, (im, (t, left, h, w)) in enumerate(zip(images, params.boxes)):
        crops[i, :h, :w] = im[t : t + h, left : left + w]
    args = (torch.from_numpy(hw), params, cfg, 84, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    cpu = train_batch(torch.from_numpy(crops), *args, per_sample=True)
    dev = train_batch(
        torch.from_numpy(crops).to(device), args[0].to(device), *args[1:], per_sample=False
    ).cpu()
    diff = (dev - cpu).abs()
    # the tolerance of tests/test_augment.py against the PIL reference (grey levels)
    ok = diff.max().item() <= 4 and diff.mean().item() < 0.3 and diff.median().item() == 0
    table.add(
        "correctness",
        f"augmentation: batched taps on {device.type} vs CPU per-sample (64 images)",
        round(diff.max().item(), 3),
        "levels",
        f"max |diff|; mean {diff.mean().item():.4f}, median {diff.median().item():g} (tolerance: max ≤ 4, mean < 0.3, median 0)",
        ok=ok,
    )


def tiny_config(tmp: Path, device: torch.device) -> Path:
    """The tests' tiny run (negmargin.testing.tiny_raw) for 3 epochs on ``device``, as a config file."""
    root = generate(tmp / "tiny", n_classes=20, n_images=12, split_sizes=(10, 5, 5), seed=3, progress=False)
    raw = tiny_raw(
        root,
        tmp / "cache",
        train={"epochs": 3, "log_interval": 1, "workers": 1, "device": str(device)},
    )
    return write_config(tmp / "tiny.py", raw)


def cli(args: list[str], env: dict | None = None, python: bool = True) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    cmd = [sys.executable, *args] if python else args
    return subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=300)


def resume_row(table: Table, device: torch.device, tmp: Path) -> None:
    config = tiny_config(tmp, device)
    whole, killed = tmp / "whole", tmp / "killed"
    base = [TRAIN, str(config), "--deterministic", "--quiet"]
    done = cli([*base, "--work-dir", str(whole)])
    first = cli([*base, "--work-dir", str(killed)], env={"NEGMARGIN_KILL_AT": "iter:20"})
    second = cli([*base, "--work-dir", str(killed), "--auto-resume"])
    if done.returncode or first.returncode != -9 or second.returncode:
        table.add(
            "correctness",
            f"kill at iteration 20 + --auto-resume on {device.type}",
            "error",
            note=(done.stderr or second.stderr or f"kill rc {first.returncode}")[-300:].replace("\n", " | "),
            ok=False,
        )
        return
    a = torch.load(whole / "latest.pth", weights_only=True)["model"]
    b = torch.load(killed / "latest.pth", weights_only=True)["model"]
    worst = max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())
    exact = all(torch.equal(a[k], b[k]) for k in a)
    # --deterministic asks torch for deterministic kernels with warn_only=True: an op that has
    # none warns "<op> does not have a deterministic implementation" — name those ops.
    ops = sorted(
        {
            line.split(" does not have a deterministic")[0].split("UserWarning: ")[-1].strip()
            for proc in (done, first, second)
            for line in proc.stderr.splitlines()
            if "does not have a deterministic" in line
        }
    )
    table.add(
        "correctness",
        f"kill at iteration 20 + --auto-resume on {device.type} vs uninterrupted (3 epochs)",
        "bit-exact" if exact else worst,
        "" if exact else "max |Δw|",
        "same final weights"
        if exact
        else "not bit-exact (tolerance 1e-3); non-deterministic kernels: "
        + (", ".join(ops) or "none reported"),
        ok=exact or worst < 1e-3,
    )


def torchrun_row(table: Table, device: torch.device, tmp: Path) -> None:
    (tmp / "dist").mkdir()
    config = tiny_config(tmp / "dist", device)
    wd = tmp / "dist" / "wd"
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", "--master_port=29517"]
    t0 = time.perf_counter()
    trained = cli(
        [*launch, TRAIN, str(config), "--work-dir", str(wd), "--quiet", "--launcher", "pytorch"], python=False
    )
    tested = cli(
        [
            *launch,
            TEST,
            str(config),
            str(wd / "best_accuracy_mean.pth"),
            "--work-dir",
            str(wd),
            "--quiet",
            "--launcher",
            "pytorch",
        ],
        python=False,
    )
    ok = trained.returncode == 0 and tested.returncode == 0
    line = next((ln for ln in tested.stdout.splitlines() if ln.startswith("accuracy_mean")), "")
    backend = "nccl" if device.type == "cuda" else "gloo"
    table.add(
        "correctness",
        f"torchrun --nproc_per_node=1 ({backend}): train.py + test.py",
        "ok" if ok else "failed",
        "",
        f"{time.perf_counter() - t0:.0f} s; {line}"
        if ok
        else (trained.stderr or tested.stderr)[-300:].replace("\n", " | "),
        ok=ok,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-root", help="miniImageNet (train.csv + images/); generated images without it")
    parser.add_argument(
        "--out", default=None, help="JSON file (default: $OUT/gpu_check.json or work_dir/gpu_check.json)"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, seconds (CI; on the CPU)")
    parser.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda, cuda:N")
    parser.add_argument(
        "--steps", type=int, default=150, help="timed steps per throughput row (ResNet12: a quarter)"
    )
    parser.add_argument("--schedule-iters", type=int, default=300, help="iterations of the real config")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="train.workers")
    parser.add_argument(
        "--skip", nargs="+", default=[], choices=["throughput", "schedule", "meta-test", "correctness"]
    )
    args = parser.parse_args()
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    smoke = args.smoke or device.type != "cuda"
    out = Path(args.out or Path(os.environ.get("OUT", REPO / "work_dir")) / "gpu_check.json")
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    header = (
        f"torch {torch.__version__}; device {device}"
        + (f" ({gpu})" if gpu else "")
        + f"; {os.cpu_count()} CPU cores; train.workers={args.workers}"
    )
    print(header)
    if device.type != "cuda":
        print("NO GPU: every row below ran on the CPU at smoke sizes; no GPU row was measured.")
    table = Table()
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="negmargin-gpu-check-") as name:
        tmp = Path(name)
        sections = {
            "throughput": lambda: throughput(args, table, device, tmp, smoke),
            "schedule": lambda: schedule(args, table, device, tmp, smoke),
            "meta-test": lambda: meta_test_rows(args, table, device, smoke),
            "correctness": lambda: (
                augmentation_row(table, device),
                resume_row(table, device, tmp),
                torchrun_row(table, device, tmp),
            ),
        }
        for section, call in sections.items():
            if section in args.skip:
                continue
            t0 = time.perf_counter()
            try:
                call()
            except Exception as exc:  # one broken section must not hide the others' numbers
                table.add(section, "section failed", type(exc).__name__, note=str(exc)[:300], ok=False)
            print(f"  ({section}: {time.perf_counter() - t0:.0f} s)", flush=True)
    report = {
        "header": header,
        "gpu_measured": device.type == "cuda" and not args.smoke,
        "smoke": smoke,
        "seconds": round(time.perf_counter() - t_start, 1),
        "rows": table.rows,
        "failed": table.failed,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"{len(table.rows)} rows in {report['seconds']:.0f} s; written to {out}")
    if table.failed:
        print("FAILED: " + "; ".join(table.failed))
        sys.exit(1)


if __name__ == "__main__":
    main()
