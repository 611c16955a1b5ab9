"""Meta-test engine speed: batched small-basis fine-tune vs the one-episode reference.

    python bench/metatest.py [--episodes 2000] [--ref-episodes 40] [--device cpu]

On random ReLU features (20 classes × 600 images, as a miniImageNet test split),
2000 5-way episodes with 15 queries, 1-shot (150 steps) and 5-shot (600 steps),
at 1600-d (Conv4) and 640-d (ResNet12). The reference is the plain loop the
reference implementation runs per episode (a fresh head module, torch.optim.SGD,
mini-batches of 4); it is timed on --ref-episodes episodes and scaled to 2000
(its cost per episode is constant). Prints one line per case with both times,
the ratio, and the process's peak RSS. All numbers of a row come from one run.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from negmargin.episodes import sample_episodes  # noqa: E402
from negmargin.finetune import FinetuneSettings, episode_randomness  # noqa: E402
from negmargin.metatest import run_episodes  # noqa: E402
from tests.reference import reference_episode  # noqa: E402  (the reference the tests check against)


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--episodes", type=int, default=2000)
    parser.add_argument("--ref-episodes", type=int, default=40)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-end-to-end", action="store_true", help="skip the whole test.py timing")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    labels = np.repeat(np.arange(20), 600)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}")
    print(
        f"{'case':<18} {'batched (s)':>11} {'reference (s)':>14} {'ratio':>7} {'ref/episode (ms)':>17} "
        f"{'acc batched':>11} {'peak RSS (GiB)':>15}"
    )
    for dim in (1600, 640):
        feats = torch.relu(torch.randn(len(labels), dim)).to(device)
        for shot in (1, 5):
            steps = 150 if shot == 1 else 600
            s = FinetuneSettings(steps=steps)
            episodes = sample_episodes(labels, 5, shot, 15, args.episodes, seed=0)
            ids = torch.arange(args.episodes)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            accs = run_episodes(feats, episodes, ids, shot, s)
            if device.type == "cuda":
                torch.cuda.synchronize()
            batched = time.perf_counter() - t0

            n = 5 * shot
            init, orders = episode_randomness(ids[: args.ref_episodes], 5, dim, n, s)
            sup_lab = torch.arange(5).repeat_interleave(shot)
            query_labels = torch.arange(5).repeat_interleave(15)
            cpu_feats = feats.cpu()
            warm = episodes[-1]  # one untimed episode: first-call overheads are not per-episode cost
            reference_episode(
                cpu_feats[warm[:, :shot].reshape(-1)],
                sup_lab,
                cpu_feats[warm[:, shot:].reshape(-1)],
                init[0],
                orders[0],
                s,
            )
            t0 = time.perf_counter()
            agree = 0
            for e in range(args.ref_episodes):
                ep = episodes[e]
                support = cpu_feats[ep[:, :shot].reshape(-1)]
                query = cpu_feats[ep[:, shot:].reshape(-1)]
                _, pred = reference_episode(support, sup_lab, query, init[e], orders[e], s)
                ref_acc = pred.eq(query_labels).double().mean().item() * 100
                agree += int(abs(ref_acc - accs[e]) < 1e-9)
            per_episode = (time.perf_counter() - t0) / args.ref_episodes
            reference = per_episode * args.episodes
            print(
                f"{dim}-d {shot}-shot{'':<8} {batched:>11.2f} {reference:>14.1f} {reference / batched:>6.0f}x "
                f"{per_episode * 1000:>17.1f} {accs.mean():>10.2f}% {peak_rss_gib():>15.2f}"
                f"   (reference scaled from {args.ref_episodes} episodes; same accuracy on "
                f"{agree}/{args.ref_episodes})"
            )


def end_to_end(tmp: Path) -> None:
    """A whole ``test.py`` run on cached features: 2000 1-shot episodes, Conv4 (1600-d)."""
    import subprocess

    from negmargin.config import Config
    from negmargin.datasets.demo import generate
    from negmargin.train import run

    root = generate(tmp / "data", n_classes=30, n_images=40, split_sizes=(10, 5, 15), progress=False)
    raw = {
        "name": "bench",
        "data": {"dataset": "folder", "root": str(root), "cache_dir": str(tmp / "cache")},
        "train": {"epochs": 1, "max_iters_per_epoch": 1, "workers": 0},
        "val": {"n_episodes": 5},
        "meta_test": {"n_episodes": 2000},
    }
    cfg = Config.from_dict(raw).validate()
    run(cfg, tmp / "wd", progress=False)
    config = tmp / "bench.py"
    config.write_text("".join(f"{k} = {v!r}\n" for k, v in raw.items()))
    cmd = [
        sys.executable,
        str(Path(__file__).resolve().parents[1] / "tools/classification/test.py"),
        str(config),
        str(tmp / "wd" / "best_accuracy_mean.pth"),
        "--work-dir",
        str(tmp / "wd"),
        "--quiet",
    ]
    for label in ("first run (extracts features)", "second run (cached features)"):
        t0 = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        wall = time.perf_counter() - t0
        acc = [line for line in out.stdout.splitlines() if line.startswith("accuracy_mean")][0]
        print(
            f"test.py, 2000 5-way 1-shot episodes, Conv4 1600-d, {label}: {wall:.1f} s wall "
            f"(including Python + torch start-up), {acc}"
        )


if __name__ == "__main__":
    main()
    if "--no-end-to-end" not in sys.argv:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            end_to_end(Path(tmp))
