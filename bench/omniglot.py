"""The margin study on real data: Neg-Margin vs margin 0 (and a positive margin) on Omniglot.

    python bench/omniglot.py --data-root ../shared/data/omniglot [--seeds 0 1 2] [--out docs/omniglot]

For each setting — cosine head with margin −0.02, −0.01, −0.005, 0 and +0.01 (a
positive margin is outside the Neg-Margin method: it is the usual large-margin
loss, run here through ``model.allow_positive_margin``), and the softmax head
with margin 0 (the Baseline) — and each seed: train Conv4 on the 964 background
characters (drawers 1-16; configs/.../omniglot/...py), keep the checkpoint with
the best 1-shot val accuracy, then measure

* base-class accuracy: 964-way top-1 of the trained head on the held-out drawers
  17-20 of the base characters (no margin at test time);
* novel-class accuracy: 2000 5-way 1-shot and 5-shot episodes on the 15 test
  alphabets (mean and 95% CI), the benchmark protocol;
* training wall time.

Writes ``results.json``, ``results.md`` and ``margin.png`` (matplotlib, optional)
in ``--out``; finished runs are kept in ``--out/runs`` and skipped when the
script is run again, so an interrupted study goes on from the first unfinished
run (that run starts over, so that its recorded training time is one whole run).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from negmargin.config import load_config  # noqa: E402
from negmargin.datasets import load_split  # noqa: E402
from negmargin.evaluate import load_trained_model  # noqa: E402
from negmargin.fileio import atomic_write_text  # noqa: E402
from negmargin.metatest import extract_features, meta_test  # noqa: E402
from negmargin.train import run  # noqa: E402

CONFIG = (
    REPO / "configs/classification/neg_margin/omniglot/neg-margin_cosine_conv4_1xb64_omniglot_5way-1shot.py"
)
# The softmax head runs at temperature 1: a plain linear classifier, the Baseline of
# Chen et al.; at the cosine head's T = 10 its unnormalised logits saturate and it
# barely learns in the first epochs (measured: 0.5% train accuracy after an epoch).
SETTINGS = [  # (label, head, margin)
    ("cosine m=-0.02", "cosine", -0.02),
    ("cosine m=-0.01", "cosine", -0.01),
    ("cosine m=-0.005", "cosine", -0.005),
    ("cosine m=0", "cosine", 0.0),
    ("cosine m=+0.01 (positive, outside the method)", "cosine", 0.01),
    ("softmax m=0, T=1 (Baseline)", "softmax", 0.0),
]


def evaluate(cfg, checkpoint: Path) -> dict:
    """Base-class accuracy on held-out drawers and novel 5-way 1-/5-shot of one checkpoint."""
    device = torch.device("cpu")
    model, ckpt = load_trained_model(cfg, checkpoint, device)
    holdout = load_split(cfg, "train_holdout", progress=False, log=lambda m: None)
    feats = extract_features(model.backbone, holdout, cfg, device, progress=False)
    with torch.no_grad():
        pred = model.head.similarity(feats).argmax(1).numpy()
    out = {"epoch": ckpt.get("epoch"), "base_accuracy": float((pred == holdout.labels).mean() * 100)}
    test = load_split(cfg, "test", progress=False, log=lambda m: None)
    test_feats = extract_features(model.backbone, test, cfg, device, progress=False)
    for shot in (1, 5):
        ev = replace(cfg.meta_test, n_shot=shot, steps=None)
        r = meta_test(test_feats, test.labels, ev, cfg.finetune, test.class_names, progress=False)
        out[f"novel_{shot}shot"] = {"mean": r.mean, "ci95": r.ci95}
    return out


def one_run(args, head: str, margin: float, seed: int, out: Path) -> dict:
    tag = f"{head}_m{margin:+g}_seed{seed}" + (f"_{args.tag}" if args.tag else "")
    wd = out / "runs" / tag
    done = wd / "result.json"
    overrides = [
        f"model.head='{head}'",
        f"model.margin={margin}",
        f"train.seed={seed}",
        f"data.root='{args.data_root}'",
        f"train.precision='{args.precision}'",
        *args.cfg_options,
    ]
    if margin > 0:
        overrides.append("model.allow_positive_margin=True")
    if head == "softmax":
        overrides.append("model.temperature=1.0")
    cfg = replace(load_config(CONFIG, overrides), name=tag)
    if done.is_file():
        return json.loads(done.read_text())
    t0 = time.time()
    summary = run(cfg, wd, progress=False)
    train_seconds = time.time() - t0
    best = evaluate(cfg, wd / "best_accuracy_mean.pth")
    # The best checkpoint is often the last epoch's: the same weights, evaluated once.
    final = best if best["epoch"] == cfg.train.epochs else evaluate(cfg, wd / "latest.pth")
    result = {
        "head": head,
        "margin": margin,
        "seed": seed,
        "precision": args.precision,
        "tag": args.tag,
        "temperature": cfg.model.temperature,
        "base_accuracy": best["base_accuracy"],
        "novel_1shot": best["novel_1shot"],
        "novel_5shot": best["novel_5shot"],
        "best_val_1shot": summary["best_accuracy_mean"],
        "best_epoch": summary["best_epoch"],
        "checkpoint_epoch": best["epoch"],
        "final": final,
        "train_seconds": round(train_seconds, 1),
        "epochs": cfg.train.epochs,
    }
    atomic_write_text(done, json.dumps(result, indent=1))
    n1, n5 = result["novel_1shot"], result["novel_5shot"]
    print(
        f"{tag}: best-val checkpoint (epoch {best['epoch']}): base {best['base_accuracy']:.2f}  "
        f"novel 1-shot {n1['mean']:.2f} ± {n1['ci95']:.2f}  5-shot {n5['mean']:.2f} ± {n5['ci95']:.2f}; "
        f"final: base {result['final']['base_accuracy']:.2f} novel 1-shot "
        f"{result['final']['novel_1shot']['mean']:.2f}  ({train_seconds / 60:.1f} min)",
        flush=True,
    )
    return result


def view(r: dict, which: str) -> dict:
    """A run's numbers for the best-val checkpoint ("best") or the last epoch ("final")."""
    if which == "final":
        return r["final"]
    return {
        "base_accuracy": r["base_accuracy"],
        "novel_1shot": r["novel_1shot"],
        "novel_5shot": r["novel_5shot"],
    }


def aggregate(results: list[dict]) -> list[dict]:
    rows = []
    for label, head, margin in SETTINGS:
        rs = [r for r in results if r["head"] == head and r["margin"] == margin]
        if not rs:
            continue
        row = {
            "setting": label,
            "head": head,
            "margin": margin,
            "seeds": len(rs),
            "train_minutes": float(np.mean([r["train_seconds"] for r in rs])) / 60,
            "best_epochs": [r["best_epoch"] for r in rs],
        }
        for which in ("best", "final"):
            vs = [view(r, which) for r in rs]
            for key in ("base_accuracy", "novel_1shot", "novel_5shot"):
                vals = np.array([v[key] if key == "base_accuracy" else v[key]["mean"] for v in vs])
                row[f"{which}_{key}"] = float(vals.mean())
                row[f"{which}_{key}_sd"] = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
                if key != "base_accuracy":
                    row[f"{which}_{key}_ci95"] = float(np.mean([v[key]["ci95"] for v in vs]))
        rows.append(row)
    return rows


def _cell(row: dict, key: str) -> str:
    text = f"{row[key]:.2f}"
    if f"{key}_ci95" in row:
        text += f" ± {row[key + '_ci95']:.2f}"
    if row["seeds"] > 1:
        text += f" (sd {row[key + '_sd']:.2f})"
    return text


def markdown(rows: list[dict], command: str) -> str:
    lines = []
    for which, title in (
        ("best", "Checkpoint with the best 1-shot val accuracy (the benchmark protocol)"),
        ("final", "Checkpoint after the last epoch"),
    ):
        lines += [
            f"**{title}**",
            "",
            "| setting | seeds | base classes: 964-way acc. on held-out drawers | novel 5-way 1-shot | "
            "novel 5-way 5-shot |" + (" best epochs | train time |" if which == "best" else ""),
            "|---|---|---|---|---|" + ("---|---|" if which == "best" else ""),
        ]
        for r in rows:
            extra = f" {r['best_epochs']} | {r['train_minutes']:.1f} min |" if which == "best" else ""
            lines.append(
                f"| {r['setting']} | {r['seeds']} | {_cell(r, which + '_base_accuracy')} | "
                f"{_cell(r, which + '_novel_1shot')} | {_cell(r, which + '_novel_5shot')} |{extra}"
            )
        lines.append("")
    lines += [
        "± is the 95% CI half-width of 2000 test episodes (averaged over seeds); sd is the standard "
        "deviation across seeds; train time per run on this 2-core CPU.",
        "",
        f"Command: `{command}`",
    ]
    return "\n".join(lines) + "\n"


def plot(groups: list[tuple[str, list[dict]]], path: Path, which: str = "final") -> bool:
    """Accuracy against margin: base classes, novel 1-shot, novel 5-shot.

    ``groups`` are (label, rows) of one study each (e.g. T = 10 and T = 30); their
    cosine rows are curves, a softmax row is drawn as a dashed Baseline line.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'negmargin[plot]'): no figure", file=sys.stderr)
        return False
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.3))
    panels = (
        ("base_accuracy", "base classes: 964-way on held-out drawers"),
        ("novel_1shot", "novel classes: 5-way 1-shot"),
        ("novel_5shot", "novel classes: 5-way 5-shot"),
    )
    margins = [r["margin"] for _, rows in groups for r in rows if r["head"] == "cosine"]
    for ax, (key, title) in zip(axes, panels):
        if margins and max(margins) > 0:
            ax.axvspan(0, max(margins) * 1.3, color="0.92", label="m > 0: outside Neg-Margin")
        ax.axvline(0, color="0.6", lw=0.8)
        full = f"{which}_{key}"
        for k, (label, rows) in enumerate(groups):
            cos = sorted((r for r in rows if r["head"] == "cosine"), key=lambda r: r["margin"])
            if cos:
                ax.errorbar(
                    [r["margin"] for r in cos],
                    [r[full] for r in cos],
                    yerr=[r[full + "_sd"] for r in cos],
                    marker="o",
                    color=f"C{k}",
                    capsize=3,
                    label=f"cosine head, {label} ({cos[0]['seeds']} seed{'s' if cos[0]['seeds'] > 1 else ''})",
                )
            for r in rows:
                if r["head"] == "softmax":
                    ax.axhline(
                        r[full], color="C3", ls="--", lw=1.2, label="softmax head, m=0, T=1 (Baseline)"
                    )
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("margin m  (target logit = T·(cos − m))")
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="best")
    what = "last-epoch checkpoints" if which == "final" else "checkpoints with the best val accuracy"
    fig.suptitle(f"Omniglot (Lake split), Conv4 28×28, {what}; mean ± sd over seeds", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-root", default=str(REPO.parent / "shared" / "data" / "omniglot"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", default=str(REPO / "docs" / "omniglot"))
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--tag", default="", help="suffix of the run folders (e.g. for a bf16 study)")
    parser.add_argument("--only", nargs="+", help="subset of settings by index (0-5)")
    parser.add_argument("--cfg-options", nargs="+", default=[])
    parser.add_argument(
        "--combine", nargs="+", help="also plot these studies' results together ('' = untagged)"
    )
    args = parser.parse_args()
    if not (Path(args.data_root) / "images_background").is_dir():
        print(f"Omniglot not found at {args.data_root} (pass --data-root); skipping.")
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(torch.get_num_threads())
    chosen = [SETTINGS[int(i)] for i in args.only] if args.only else SETTINGS
    results = []
    for seed in args.seeds:
        for _, head, margin in chosen:
            results.append(one_run(args, head, margin, seed, out))
    all_results = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*/result.json"))]
    all_results = [
        r for r in all_results if r["precision"] == args.precision and r.get("tag", "") == args.tag
    ]
    rows = aggregate(all_results)
    shown = [shlex.quote(a) for a in sys.argv[1:] if not a.startswith("--data-root") and a != args.data_root]
    command = " ".join(["python bench/omniglot.py --data-root ../shared/data/omniglot", *shown])
    suffix = f"_{args.tag}" if args.tag else ""
    atomic_write_text(
        out / f"results{suffix}.json", json.dumps({"rows": rows, "runs": all_results}, indent=1)
    )
    atomic_write_text(out / f"results{suffix}.md", markdown(rows, command))
    temperature = all_results[0].get("temperature", 10.0) if all_results else 10.0
    plot([(f"T={temperature:g}", rows)], out / f"margin{suffix}.png")
    if args.combine:
        groups = []
        for tag in args.combine:
            data = json.loads((out / f"results{'_' + tag if tag else ''}.json").read_text())
            t = data["runs"][0].get("temperature", 10.0)
            groups.append((f"T={t:g}", data["rows"]))
        plot(groups, out / "margin_combined.png")
    print(markdown(rows, command))


if __name__ == "__main__":
    main()
