"""Parity with the reference under one shortened schedule, on real miniImageNet.

    python bench/mini_parity.py --runs fp32=work_dir/mini/fp32_s0 bf16=work_dir/mini/bf16_s0 \
        [--rescore 1000] [--out docs/mini_imagenet]

The runs are made first (docs/mini_imagenet.md gives the commands): our Conv4
miniImageNet 1-shot config with the reference's shortened schedule (10 epochs,
steps at 3 and 6, warm-up 150 iterations, val every epoch, a checkpoint every
epoch), then ``test.py --shots 1 5`` on its ``best_accuracy_mean.pth``. This script
reads each run's log and test results and, with ``--rescore N``, scores every
epoch's checkpoint on N further val episodes (another episode seed), which
separates the draw of the 100 fixed val episodes from the model. It writes
``parity.json``, ``parity.md`` and ``parity.png`` (our val curves beside the
reference's, with their 95% CI bands) in ``--out``.

The reference numbers are mmfewshot v0.1.0's Conv4 miniImageNet 1-shot config with
``runner.max_epochs=10 lr_config.step=[3,6] lr_config.warmup_iters=150
evaluation.interval=1``, seed 0, run on these same images on a 2-core machine like
ours (issue 12): validation on its 100 fixed 5-way 1-shot val episodes after epochs
1-5, and 0.75-0.84 s per 64-image iteration in fp32.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from negmargin.config import load_config  # noqa: E402
from negmargin.datasets import load_split  # noqa: E402
from negmargin.episodes import sample_episodes  # noqa: E402
from negmargin.features import extract_features  # noqa: E402
from negmargin.fileio import atomic_write_text  # noqa: E402
from negmargin.meta_test import meta_test_episodes  # noqa: E402
from negmargin.model import load_trained_model  # noqa: E402
from negmargin.runtime import Runtime  # noqa: E402

REFERENCE = {
    "label": "reference (mmfewshot v0.1.0), fp32",
    "epochs": [1, 2, 3, 4, 5],
    "val_mean": [34.68, 37.36, 39.15, 39.93, 40.33],
    "val_ci95": [1.66, 1.79, 1.96, 1.83, 1.88],
    "seconds_per_iteration": [0.75, 0.84],
}
RESCORE_SEED = 1  # the fixed val episodes use episode seed 0


def read_log(wd: Path) -> tuple[list[dict], list[dict]]:
    entries = [json.loads(line) for p in sorted(wd.glob("*.log.json")) for line in p.read_text().splitlines()]
    train = [e for e in entries if e.get("mode") == "train"]
    val = {e["epoch"]: e for e in entries if e.get("mode") == "val"}  # a resumed epoch: the last record
    return train, [val[k] for k in sorted(val)]


def rescore(wd: Path, cfg, n_episodes: int) -> dict[int, dict]:
    """Every epoch checkpoint's 1-shot accuracy on ``n_episodes`` other val episodes (cached in the run dir)."""
    cache = wd / f"rescore_val{n_episodes}.json"
    done = {int(k): v for k, v in json.loads(cache.read_text()).items()} if cache.is_file() else {}
    ev = replace(cfg.val, n_episodes=n_episodes, episode_seed=RESCORE_SEED)
    val = load_split(cfg, "val", progress=False, log=lambda m: None)
    episodes = sample_episodes(
        val.labels, ev.n_way, ev.n_shot, ev.n_query, ev.n_episodes, ev.episode_seed, val.class_names
    )
    used, local = torch.unique(episodes, return_inverse=True)
    cpu = Runtime(torch.device("cpu"), "fp32", channels_last=False)
    for path in sorted(wd.glob("epoch_*.pth"), key=lambda p: int(p.stem.split("_")[1])):
        epoch = int(path.stem.split("_")[1])
        if epoch in done:
            continue
        model, _ = load_trained_model(cfg, path, cpu.device, channels_last=cfg.train.channels_last == "on")
        feats = extract_features(model.backbone, val, cfg, cpu, progress=False, indices=used.numpy())
        r = meta_test_episodes(feats, local, ev, cfg.finetune, progress=False)
        done[epoch] = {"mean": r.mean, "ci95": r.ci95}
        print(f"{wd.name} epoch {epoch}: {n_episodes} val episodes {r.mean:.2f} ± {r.ci95:.2f}", flush=True)
        atomic_write_text(cache, json.dumps(done, indent=1))
    return done


def summarise(label: str, wd: Path, n_rescore: int) -> dict:
    config = next(wd.glob("neg-margin_*.py"))
    cfg = load_config(config)
    train, val = read_log(wd)
    per_iter = statistics.median(e["time"] for e in train)
    out = {
        "label": label,
        "work_dir": str(wd),
        "precision": cfg.train.precision,
        "channels_last": cfg.train.channels_last,
        "epochs": [e["epoch"] for e in val],
        "val_mean": [e["accuracy_mean"] for e in val],
        "val_ci95": [e["accuracy_ci95"] for e in val],
        "seconds_per_iteration": per_iter,
        "images_per_second": cfg.train.batch_size / per_iter,
        # the fastest logged 50-iteration interval: the rate when nothing else ran beside it
        "images_per_second_fastest": cfg.train.batch_size / min(e["time"] for e in train),
        # logged averages × the iterations they cover; validations add their own seconds
        "train_minutes": sum(e["time"] * cfg.train.log_interval for e in train) / 60,
    }
    best = max(range(len(val)), key=lambda i: (val[i]["accuracy_mean"], -i)) if val else None
    out["best_val"] = {"epoch": val[best]["epoch"], "mean": val[best]["accuracy_mean"]} if val else None
    for shot in (1, 5):
        path = next(wd.glob(f"meta_test_test_5way-{shot}shot_best_accuracy_mean_*.json"), None)
        if path is not None:
            r = json.loads(path.read_text())
            out[f"test_{shot}shot"] = {
                "mean": r["accuracy_mean"],
                "ci95": r["accuracy_ci95"],
                "checkpoint_epoch": r.get("checkpoint_epoch"),
            }
    if n_rescore:
        scores = rescore(wd, cfg, n_rescore)
        out[f"rescore_{n_rescore}"] = {str(k): scores[k] for k in sorted(scores)}
    return out


def outside(epochs: list[int], means: list[float]) -> list[int]:
    """Epochs at which our val mean lies outside the reference's 95% CI."""
    ref = dict(zip(REFERENCE["epochs"], zip(REFERENCE["val_mean"], REFERENCE["val_ci95"])))
    return [e for e, m in zip(epochs, means) if e in ref and abs(m - ref[e][0]) > ref[e][1]]


def markdown(runs: list[dict], n_rescore: int, command: str) -> str:
    epochs = sorted({e for r in runs for e in r["epochs"]} | set(REFERENCE["epochs"]))
    head = (
        "| epoch | "
        + " | ".join(
            [REFERENCE["label"]]
            + [f"ours, {r['label']}" for r in runs]
            + ([f"ours, {r['label']}, {n_rescore} other val episodes" for r in runs] if n_rescore else [])
        )
        + " |"
    )
    lines = [
        "**Validation: 100 fixed 5-way 1-shot val episodes, mean ± 95% CI**",
        "",
        head,
        "|---" * (head.count("|") - 1) + "|",
    ]
    for e in epochs:
        cells = []
        ref = dict(zip(REFERENCE["epochs"], zip(REFERENCE["val_mean"], REFERENCE["val_ci95"])))
        cells.append(f"{ref[e][0]:.2f} ± {ref[e][1]:.2f}" if e in ref else "–")
        for r in runs:
            v = dict(zip(r["epochs"], zip(r["val_mean"], r["val_ci95"])))
            cells.append(f"{v[e][0]:.2f} ± {v[e][1]:.2f}" if e in v else "–")
        if n_rescore:
            for r in runs:
                s = r.get(f"rescore_{n_rescore}", {}).get(str(e))
                cells.append(f"{s['mean']:.2f} ± {s['ci95']:.2f}" if s else "–")
        lines.append(f"| {e} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "**Test (2000 episodes of the 20 test classes) with the best-val checkpoint, and speed**",
        "",
        "| run | best val (epoch) | test 5-way 1-shot | test 5-way 5-shot | img/s: median iteration (fastest interval) | training time |",
        "|---|---|---|---|---|---|",
    ]
    lo, hi = REFERENCE["seconds_per_iteration"]
    lines.append(
        f"| {REFERENCE['label']} | not given for epochs 6-10 | not run | not run | "
        f"{64 / hi:.0f}–{64 / lo:.0f} | – |"
    )
    for r in runs:
        t1, t5 = r.get("test_1shot"), r.get("test_5shot")
        cell = lambda t: f"{t['mean']:.2f} ± {t['ci95']:.2f}" if t else "–"  # noqa: E731
        best = f"{r['best_val']['mean']:.2f} ({r['best_val']['epoch']})" if r["best_val"] else "–"
        lines.append(
            f"| ours, {r['label']} | {best} | {cell(t1)} | {cell(t5)} | {r['images_per_second']:.0f} "
            f"({r.get('images_per_second_fastest', 0):.0f}) | "
            f"{r['train_minutes']:.0f} min |"
        )
    lines += ["", f"Command: `{command}`"]
    for r in runs:
        compared = [e for e in r["epochs"] if e in REFERENCE["epochs"]]
        checks = [("100 fixed val episodes", r["epochs"], r["val_mean"])]
        scores = r.get(f"rescore_{n_rescore}") if n_rescore else None
        if scores:
            checks.append(
                (
                    f"{n_rescore} other val episodes",
                    [int(k) for k in scores],
                    [v["mean"] for v in scores.values()],
                )
            )
        for what, epochs, means in checks:
            off = outside(epochs, means)
            lines.append(
                f"- {r['label']}, {what}: mean outside the reference's 95% CI at epoch(s) {off} of {compared}"
                if off
                else f"- {r['label']}, {what}: mean within the reference's 95% CI at every epoch compared ({compared})"
            )
    return "\n".join(lines) + "\n"


def plot(runs: list[dict], n_rescore: int, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'negmargin[plot]'): no figure", file=sys.stderr)
        return False
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    curves = [(REFERENCE["label"], REFERENCE, "k")] + [
        (f"ours, {r['label']}", r, f"C{i}") for i, r in enumerate(runs)
    ]
    for label, r, color in curves:
        e, m, c = r["epochs"], r["val_mean"], r["val_ci95"]
        ax.plot(e, m, marker="o", color=color, label=f"{label}: 100 fixed val episodes")
        ax.fill_between(
            e, [a - b for a, b in zip(m, c)], [a + b for a, b in zip(m, c)], color=color, alpha=0.15
        )
    for i, r in enumerate(runs):
        s = r.get(f"rescore_{n_rescore}") if n_rescore else None
        if s:
            ks = sorted(int(k) for k in s)
            ax.errorbar(
                ks,
                [s[str(k)]["mean"] for k in ks],
                yerr=[s[str(k)]["ci95"] for k in ks],
                color=f"C{i}",
                ls=":",
                marker="s",
                ms=4,
                capsize=2,
                label=f"ours, {r['label']}: same checkpoints on {n_rescore} other val episodes",
            )
    ax.axvline(3.5, color="0.7", lw=0.8, ls="--")
    ax.axvline(6.5, color="0.7", lw=0.8, ls="--")
    ax.set_xlabel("epoch (lr × 0.1 after epochs 3 and 6)")
    ax.set_ylabel("5-way 1-shot val accuracy (%), ± 95% CI")
    ax.set_title("miniImageNet, Conv4, 10-epoch schedule, seed 0: ours vs the reference", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", nargs="+", required=True, help="label=work_dir of each run")
    parser.add_argument(
        "--rescore", type=int, default=0, help="also score each epoch on N other val episodes"
    )
    parser.add_argument("--out", default=str(REPO / "docs" / "mini_imagenet"))
    args = parser.parse_args()
    runs = []
    for spec in args.runs:
        label, _, wd = spec.partition("=")
        if not Path(wd).is_dir():
            print(f"run folder '{wd}' does not exist (make the run first); skipping it", file=sys.stderr)
            continue
        runs.append(summarise(label, Path(wd), args.rescore))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python bench/mini_parity.py " + " ".join(sys.argv[1:])
    atomic_write_text(out / "parity.json", json.dumps({"reference": REFERENCE, "runs": runs}, indent=1))
    atomic_write_text(out / "parity.md", markdown(runs, args.rescore, command))
    plot(runs, args.rescore, out / "parity.png")
    print((out / "parity.md").read_text())


if __name__ == "__main__":
    main()
