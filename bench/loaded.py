"""Fast on a busy machine too: the input path, prediction and test.py, idle and with one core busy.

    python bench/loaded.py [--data-root ../shared/data/mini_imagenet --checkpoint CKPT]

Each row is timed twice — idle, and while a second process keeps one core busy
(the CPU burner of bench/metatest.py) — and each parallel path is timed beside
the same path with its parallelism turned off, in the same run:

* **input path**: Conv4 fp32 training steps fed by ``TrainLoader`` with its
  background thread (``train.workers=1``, the default) against the same loader
  in the main thread (``train.workers=0``); real miniImageNet train images with
  ``--data-root``, else generated ~500×375 JPEGs;
* **predict**: ``FewShotClassifier`` fit on 5 classes × 5 images and predicting
  100 queries (median of 5 alternating calls) (real miniImageNet test images with ``--data-root``, else generated
  ones) with torch's default threads against one thread;
* **test.py**: with ``--checkpoint`` (a Conv4 miniImageNet checkpoint) and
  ``--data-root``, the whole ``test.py --shots 1 5`` (start-up, extraction of the
  12,000 test images, 2000 1-shot and 2000 5-shot episodes), fresh work dir each time.

All numbers of a table come from one run; the machine must otherwise be idle.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from common import CpuBurner, make_jpegs, our_batches, timed_steps, train_step  # noqa: E402

from negmargin.config import Config  # noqa: E402
from negmargin.datasets import load_split  # noqa: E402
from negmargin.datasets.demo import generate  # noqa: E402
from negmargin.finetune import intra_op_threads  # noqa: E402
from negmargin.loader import TrainLoader  # noqa: E402
from negmargin.model import build_model  # noqa: E402
from negmargin.predict import FewShotClassifier  # noqa: E402
from negmargin.runtime import Runtime  # noqa: E402
from negmargin.train import run  # noqa: E402

MINI_CONFIG = (
    REPO
    / "configs/classification/neg_margin/mini_imagenet/neg-margin_cosine_conv4_1xb64_mini-imagenet_5way-1shot.py"
)


def input_path_rates(cfg: Config, steps: int) -> dict[str, float]:
    packed = load_split(cfg, "train", progress=False, log=lambda m: None)
    cpu = torch.device("cpu")
    rates = {}
    for workers in (1, 0, 1):  # the first is a warm-up; the third is kept
        run_cfg = replace(cfg, train=replace(cfg.train, workers=workers))
        torch.manual_seed(0)
        model = build_model(run_cfg, packed.num_classes).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        step = functools.partial(train_step, model, opt, Runtime(cpu, "fp32", True))
        loader = TrainLoader(packed, run_cfg, 64, cpu, channels_last=True)
        rates[f"workers={workers}"] = timed_steps(step, our_batches(loader), 2, steps)
    return rates


def predict_seconds(clf: FewShotClassifier, support, labels, queries, repeats: int = 5) -> dict[str, float]:
    """Median seconds of fit + predict, default threads and one thread, alternating (a short call: one
    sample is at the mercy of the other process's timing)."""
    clf.fit(support, labels)  # warm-up, untimed: first-call costs are not the path's
    clf.predict_rows(queries[:8], top_k=3)
    times: dict[str, list[float]] = {"default threads": [], "one thread": []}
    for _ in range(repeats):
        for label, threads in (("default threads", torch.get_num_threads()), ("one thread", 1)):
            with intra_op_threads(threads):
                t0 = time.perf_counter()
                clf.fit(support, labels)
                clf.predict_rows(queries, top_k=3)
                times[label].append(time.perf_counter() - t0)
    return {label: statistics.median(ts) for label, ts in times.items()}


def test_py_seconds(args, tmp: Path, tag: str) -> tuple[float, str]:
    cmd = [
        sys.executable,
        str(REPO / "tools/classification/test.py"),
        str(MINI_CONFIG),
        args.checkpoint,
        "--shots", "1", "5",
        "--data-root", args.data_root,
        "--work-dir", str(tmp / f"test-{tag}"),
        "--quiet",
        "--cfg-options", f"data.cache_dir='{args.cache_dir or tmp / 'cache'}'",
    ]  # fmt: skip
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - t0
    accs = [
        line.split(":", 1)[1].strip() for line in done.stdout.splitlines() if line.startswith("accuracy_mean")
    ]
    return seconds, " / ".join(accs)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-root", help="miniImageNet (train.csv, test.csv, images/)")
    parser.add_argument("--checkpoint", help="a Conv4 miniImageNet checkpoint for the test.py rows")
    parser.add_argument("--cache-dir", help="data.cache_dir (default: a temporary folder)")
    parser.add_argument("--steps", type=int, default=30, help="timed training steps per input-path row")
    args = parser.parse_args()
    real = bool(args.data_root) and (Path(args.data_root) / "train.csv").is_file()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; data: {'real miniImageNet' if real else 'generated'}"
    )
    with tempfile.TemporaryDirectory(prefix="negmargin-loaded-") as name:
        tmp = Path(name)
        cache = args.cache_dir or str(tmp / "cache")
        if real:
            cfg = Config.from_dict(
                {"data": {"dataset": "mini_imagenet", "root": args.data_root, "cache_dir": cache}}
            ).validate()
        else:
            make_jpegs(tmp / "jpegs", 8, 60)
            cfg = Config.from_dict(
                {
                    "data": {
                        "dataset": "folder",
                        "root": str(tmp / "jpegs"),
                        "cache_dir": cache,
                        "options": {"split_fractions": (1, 0, 0)},
                    }
                }  # fmt: skip
            ).validate()
        # a small trained checkpoint for prediction (its accuracy does not matter here)
        demo = generate(tmp / "demo", n_classes=20, n_images=30, split_sizes=(10, 5, 5), progress=False)
        small = Config.from_dict(
            {
                "name": "p",
                "data": {
                    "dataset": "folder",
                    "root": str(demo),
                    "cache_dir": str(tmp / "c2"),
                    "image_size": 84,
                },
                "train": {"epochs": 1, "max_iters_per_epoch": 2, "workers": 0},
                "val": {"n_episodes": 4},
            }  # fmt: skip
        ).validate()
        run(small, tmp / "p", progress=False)
        clf = FewShotClassifier.from_checkpoint(tmp / "p" / "best_accuracy_mean.pth", device="cpu")
        if real:
            rows = [
                line.split(",") for line in (Path(args.data_root) / "test.csv").read_text().splitlines()[1:]
            ]
            by_class: dict[str, list[str]] = {}
            for f, w in rows:
                by_class.setdefault(w, []).append(str(Path(args.data_root) / "images" / f))
            classes = sorted(by_class)[:5]
            support = [p for c in classes for p in by_class[c][:5]]
            labels = [c for c in classes for _ in range(5)]
            queries = [p for c in classes for p in by_class[c][5:25]]
        else:
            files = sorted((demo).rglob("*.png"))
            names = sorted({f.parent.name for f in files})[:5]
            support = [f for n in names for f in sorted((demo / n).glob("*.png"))[:5]]
            labels = [f.parent.name for f in support]
            queries = [f for n in names for f in sorted((demo / n).glob("*.png"))[5:25]]

        results: dict[str, dict] = {}
        for condition in ("idle", "loaded"):
            with CpuBurner() if condition == "loaded" else contextlib.nullcontext():
                rates = input_path_rates(cfg, args.steps)
                pred = predict_seconds(clf, support, labels, queries)
                test = test_py_seconds(args, tmp, condition) if (real and args.checkpoint) else None
            results[condition] = {"input": rates, "predict": pred, "test": test}
            print(
                f"{condition:<7} input path (Conv4 fp32, batch 64): background thread {rates['workers=1']:.1f} img/s, "
                f"main thread only {rates['workers=0']:.1f} img/s (ratio {rates['workers=1'] / rates['workers=0']:.2f}); "
                f"predict 25 support + {len(queries)} queries: default threads {pred['default threads']:.2f} s, "
                f"one thread {pred['one thread']:.2f} s (ratio {pred['one thread'] / pred['default threads']:.2f})",
                flush=True,
            )
            if test:
                print(
                    f"{condition:<7} test.py --shots 1 5 (Conv4, 12,000 test images): {test[0]:.1f} s wall; accuracy {test[1]}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
