"""Meta-test engine speed: batched small-basis fine-tune vs the one-episode reference.

    python bench/metatest.py [--episodes 2000] [--ref-episodes 40] [--device cpu] [--loaded]

On random ReLU features (20 classes × 600 images, as a miniImageNet test split),
2000 5-way episodes with 15 queries, 1-shot (150 steps) and 5-shot (600 steps),
at 1600-d (Conv4) and 640-d (ResNet12). The reference is the plain loop the
reference implementation runs per episode (a fresh head module, torch.optim.SGD,
mini-batches of 4, on one thread: its ops are too small to gain from more); it is
timed on --ref-episodes episodes and scaled to 2000 (its cost per episode is
constant). Prints one line per case with both times, the ratio, and the
process's peak RSS. All numbers of a row come from one run.

``--loaded`` measures every case twice: on an idle machine, and while a second
process keeps one core busy (a plain CPU burner the bench starts and stops), as a
shared server or a laptop always is. ``--variants`` adds two other ways to run the
engine on a CPU, to show why the default is what it is: ``ops on all cores`` (one
chunk of up to 1024 episodes at a time, each op split over torch's threads: the
engine before this choice) and ``one thread`` (everything on one core, one chunk
after the other).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import CpuBurner  # noqa: E402

from negmargin.episodes import sample_episodes  # noqa: E402
from negmargin.finetune import (  # noqa: E402
    FinetuneConfig,
    compute_grams,
    episode_randomness,
    finetune,
    intra_op_threads,
    query_scores,
)
from negmargin.meta_test import run_episodes  # noqa: E402
from negmargin.testing import reference_episode  # noqa: E402  (the reference the tests check against)


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def ops_on_all_cores(feats, episodes, ids, shot, s, steps) -> np.ndarray:
    """The engine as it ran before its parallelism was chosen: one chunk of up to 1024
    episodes at a time, every op split over torch's threads (same algebra, same numbers)."""
    E, n_way, per_class = episodes.shape
    n, q = n_way * shot, n_way * (per_class - shot)
    support_labels = torch.arange(n_way).repeat_interleave(shot)
    query_labels = torch.arange(n_way).repeat_interleave(per_class - shot)
    out = np.empty(E)
    for start in range(0, E, 1024):
        ep = episodes[start : start + 1024]
        m = len(ep)
        support, query = feats[ep[:, :, :shot].reshape(m, n)], feats[ep[:, :, shot:].reshape(m, q)]
        init, orders = episode_randomness(ids[start : start + m], n_way, feats.shape[1], n, s, steps)
        grams = compute_grams(support, init, query)
        head = finetune(grams, support_labels.expand(m, n), orders, s, steps)
        pred = query_scores(grams, head).argmax(-1)
        out[start : start + m] = (pred == query_labels).double().mean(-1).mul(100).numpy()
    return out


def time_engine(
    feats, episodes, ids, shot, s, steps, device, variant: str = "default"
) -> tuple[float, np.ndarray]:
    def call():
        if variant == "ops on all cores":
            return ops_on_all_cores(feats, episodes, ids, shot, s, steps)
        if variant == "one thread":
            with intra_op_threads(1):
                return run_episodes(feats, episodes, ids, shot, replace(s, threads=1), steps)
        return run_episodes(feats, episodes, ids, shot, s, steps)

    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    accs = call()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, accs


def time_reference(feats, episodes, shot, s, steps, dim, accs, n_ref: int) -> tuple[float, int]:
    """Seconds per episode of the one-episode loop, and on how many episodes it agrees."""
    n = 5 * shot
    init, orders = episode_randomness(torch.arange(n_ref), 5, dim, n, s, steps)
    sup_lab = torch.arange(5).repeat_interleave(shot)
    query_labels = torch.arange(5).repeat_interleave(15)
    cpu_feats = feats.cpu()
    with intra_op_threads(1):
        warm = episodes[-1]  # one untimed episode: first-call overheads are not per-episode cost
        reference_episode(
            cpu_feats[warm[:, :shot].reshape(-1)],
            sup_lab,
            cpu_feats[warm[:, shot:].reshape(-1)],
            init[0],
            orders[0],
            s,
            steps,
        )
        t0 = time.perf_counter()
        agree = 0
        for e in range(n_ref):
            ep = episodes[e]
            _, pred = reference_episode(
                cpu_feats[ep[:, :shot].reshape(-1)],
                sup_lab,
                cpu_feats[ep[:, shot:].reshape(-1)],
                init[e],
                orders[e],
                s,
                steps,
            )
            ref_acc = pred.eq(query_labels).double().mean().item() * 100
            agree += int(abs(ref_acc - accs[e]) < 1e-9)
    return (time.perf_counter() - t0) / n_ref, agree


def measure(args, device, condition: str, variants: list[str]) -> None:
    labels = np.repeat(np.arange(20), 600)
    for dim in (1600, 640):
        torch.manual_seed(dim)
        feats = torch.relu(torch.randn(len(labels), dim)).to(device)
        for shot in (1, 5):
            s, steps = FinetuneConfig(), (150 if shot == 1 else 600)
            episodes = sample_episodes(labels, 5, shot, 15, args.episodes, seed=0)
            ids = torch.arange(args.episodes)
            batched, accs = time_engine(feats, episodes, ids, shot, s, steps, device)
            others = []
            for v in variants:
                t, other = time_engine(feats, episodes, ids, shot, s, steps, device, v)
                assert np.array_equal(other, accs), f"{v}: different accuracies"
                others.append(f"{v}: {t:.2f} s")
            per_episode, agree = time_reference(feats, episodes, shot, s, steps, dim, accs, args.ref_episodes)
            reference = per_episode * args.episodes
            print(
                f"{condition:<7} {dim}-d {shot}-shot{'':<3} {batched:>11.2f} {reference:>14.1f} "
                f"{reference / batched:>6.0f}x {per_episode * 1000:>17.1f} {accs.mean():>10.2f}% "
                f"{peak_rss_gib():>15.2f}   (same accuracy on {agree}/{args.ref_episodes}"
                + (f"; {', '.join(others)}" if others else "")
                + ")",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--episodes", type=int, default=2000)
    parser.add_argument("--ref-episodes", type=int, default=40)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--loaded", action="store_true", help="also measure with one core kept busy")
    parser.add_argument("--variants", action="store_true", help="also time the other CPU parallelisms")
    parser.add_argument("--no-end-to-end", action="store_true", help="skip the whole test.py timing")
    args = parser.parse_args()
    device = torch.device(args.device)
    variants = ["ops on all cores", "one thread"] if args.variants and device.type == "cpu" else []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}")
    print(
        f"{'machine':<7} {'case':<14} {'batched (s)':>11} {'reference (s)':>14} {'ratio':>7} "
        f"{'ref/episode (ms)':>17} {'acc batched':>11} {'peak RSS (GiB)':>15}"
    )
    measure(args, device, "idle", variants)
    if args.loaded:
        with CpuBurner():
            measure(args, device, "loaded", variants)


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
            if "--loaded" in sys.argv:
                with CpuBurner():
                    print("with one core kept busy:")
                    (Path(tmp) / "loaded").mkdir()
                    end_to_end(Path(tmp) / "loaded")  # a fresh folder: nothing cached
