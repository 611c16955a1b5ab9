"""The margin study on real data: accuracy on base and novel classes against the margin.

    python bench/margin_study.py omniglot --data-root ../shared/data/omniglot [--seeds 0 1 2]
    python bench/margin_study.py mini_imagenet --data-root ../shared/data/mini_imagenet [--only 0 1 2]

One runner, one study per dataset (``STUDIES``): a config, the schedule overrides
that fit this machine, and a grid of settings — the cosine head at several margins
(a positive margin is outside the Neg-Margin method: the usual large-margin loss,
run through ``model.allow_positive_margin`` as the study's control), at the
config's temperature or the paper's 30, and the softmax head with margin 0 (the
Baseline of Chen et al.). For each setting and seed: train Conv4, then measure the
checkpoint with the best 1-shot val accuracy (the benchmark protocol) and the
last epoch's:

* base-class accuracy: top-1 of the trained head on base-class images held out
  from training (``data.options.base_holdout``; no margin at test time);
* novel-class accuracy: 2000 5-way 1-shot and 5-shot episodes on the test
  classes (mean and 95% CI), the benchmark protocol;
* training wall time and img/s (median iteration time of the run's log).

Every run is scored on the same held-out images and test episodes, and its per-item
scores are kept (``items/<run>.npz``), so the report also gives paired differences:
each run against m = 0 of its seed, and each later seed against the first of its
setting (the training noise).

Writes ``results[_tag].json``, ``.md``, ``margin[_tag].png`` and ``paired[_tag].png``
(matplotlib, optional) in ``--out`` (default ``docs/<dataset>``) after every finished run, so
the committed files are the study's state: a run already in ``results.json`` is
skipped, and an interrupted run resumes from its ``latest.pth`` in
``--runs-dir``. Without the data (a user's clone has no ``../shared``) it says so
and exits 0.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from negmargin.config import Config, load_config  # noqa: E402
from negmargin.datasets import load_split  # noqa: E402
from negmargin.features import extract_features  # noqa: E402
from negmargin.fileio import atomic_save, atomic_write_text  # noqa: E402
from negmargin.meta_test import meta_test, paired_difference  # noqa: E402
from negmargin.model import load_trained_model  # noqa: E402
from negmargin.runtime import Runtime  # noqa: E402
from negmargin.train import run  # noqa: E402

CONFIGS = REPO / "configs/classification/neg_margin"


@dataclass(frozen=True)
class Setting:
    label: str
    head: str
    margin: float
    temperature: float | None = None  # None: the config's (or --cfg-options')


@dataclass(frozen=True)
class Study:
    config: Path
    marker: str  # a path under the data root that shows the dataset is there
    overrides: tuple[str, ...]  # the study's schedule and base-class hold-out
    precision: str
    settings: tuple[Setting, ...]
    base_task: str
    title: str


# The softmax head runs at temperature 1: a plain linear classifier, the Baseline of
# Chen et al.; at the cosine head's T = 10 its unnormalised logits saturate and it
# barely learns in the first epochs (measured on Omniglot: 0.5% train accuracy after an epoch).
BASELINE = Setting("softmax m=0, T=1 (Baseline)", "softmax", 0.0, 1.0)
POSITIVE = "(positive, outside the method)"

STUDIES = {
    "omniglot": Study(
        config=CONFIGS / "omniglot/neg-margin_cosine_conv4_1xb64_omniglot_5way-1shot.py",
        marker="images_background",
        overrides=(),
        precision="fp32",
        settings=(
            Setting("cosine m=-0.02", "cosine", -0.02),
            Setting("cosine m=-0.01", "cosine", -0.01),
            Setting("cosine m=-0.005", "cosine", -0.005),
            Setting("cosine m=0", "cosine", 0.0),
            Setting(f"cosine m=+0.01 {POSITIVE}", "cosine", 0.01),
            BASELINE,
        ),
        base_task="964-way, held-out drawers",
        title="Omniglot (Lake split), Conv4 28×28",
    ),
    # The shortened schedule of the parity run (the reference's own overrides: 10 epochs,
    # steps at 3 and 6, warm-up 150 iterations, val every epoch), with 60 of each base
    # class's 600 images held out to measure base accuracy (64-way on 3,840 images).
    # Settings in the order they run: the most telling pairs first, so that a study cut
    # short still shows the effect at both temperatures.
    "mini_imagenet": Study(
        config=CONFIGS / "mini_imagenet/neg-margin_cosine_conv4_1xb64_mini-imagenet_5way-1shot.py",
        marker="train.csv",
        overrides=(
            "train.epochs=10",
            "train.milestones=[3,6]",
            "train.warmup_iters=150",
            "val.interval=1",
            "data.options.base_holdout=60",
        ),
        precision="bf16",
        settings=(
            Setting("cosine T=10 m=0", "cosine", 0.0, 10.0),
            Setting("cosine T=10 m=-0.05", "cosine", -0.05, 10.0),
            Setting("cosine T=30 m=0", "cosine", 0.0, 30.0),
            Setting("cosine T=30 m=-0.05", "cosine", -0.05, 30.0),
            BASELINE,
            Setting("cosine T=10 m=-0.1", "cosine", -0.1, 10.0),
            # After the first five runs (T = 30, m = -0.05 cost 1.2 points of novel 1-shot
            # against m = 0), T = 30's side of the curve comes first: the paper's -0.02 and
            # the positive control, then -0.1.
            Setting("cosine T=30 m=-0.02", "cosine", -0.02, 30.0),
            Setting(f"cosine T=30 m=+0.05 {POSITIVE}", "cosine", 0.05, 30.0),
            Setting(f"cosine T=10 m=+0.05 {POSITIVE}", "cosine", 0.05, 10.0),
            Setting("cosine T=30 m=-0.1", "cosine", -0.1, 30.0),
            Setting("cosine T=10 m=-0.02", "cosine", -0.02, 10.0),
            Setting("cosine T=10 m=-0.005 (the config)", "cosine", -0.005, 10.0),
            Setting("cosine T=30 m=-0.005", "cosine", -0.005, 30.0),
        ),
        base_task="64-way, 60 held-out images per class",
        title="miniImageNet (Ravi split, 84×84 release), Conv4, 10-epoch schedule",
    ),
}


def evaluate(cfg: Config, checkpoint: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """Base-class accuracy on held-out images and novel 5-way 1-/5-shot of one checkpoint.

    Returns the summary and the per-item scores behind it: ``base_hits`` (n_images,)
    0/100 per held-out image, ``novel_1shot``/``novel_5shot`` (2000,) per-episode
    accuracy — the same images and episodes for every run, so two runs compare paired.
    """
    # fp32, contiguous inputs into the checkpoint's channels-last model: as the study always measured
    cpu = Runtime(torch.device("cpu"), "fp32", channels_last=False)
    model, ckpt = load_trained_model(cfg, checkpoint, cpu.device)
    holdout = load_split(cfg, "train_holdout", progress=False, log=lambda m: None)
    feats = extract_features(model.backbone, holdout, cfg, cpu, progress=False)
    with torch.no_grad():  # head rows beyond the base classes never had a label (mini's 100 rows)
        pred = model.head.similarity(feats)[:, : holdout.num_classes].argmax(1).numpy()
    hits = (pred == holdout.labels).astype(np.float32) * 100
    out = {"epoch": ckpt.get("epoch"), "base_accuracy": float(hits.mean()), "base_ci95": ci95(hits)}
    items = {"base_hits": hits}
    test = load_split(cfg, "test", progress=False, log=lambda m: None)
    test_feats = extract_features(model.backbone, test, cfg, cpu, progress=False)
    for shot in (1, 5):
        ev = replace(cfg.meta_test, n_shot=shot, steps=None)
        r = meta_test(test_feats, test.labels, ev, cfg.finetune, test.class_names, progress=False)
        out[f"novel_{shot}shot"] = {"mean": r.mean, "ci95": r.ci95}
        items[f"novel_{shot}shot"] = r.accuracies.astype(np.float32)
    return out, items


def save_items(path: Path, best: dict[str, np.ndarray], final: dict[str, np.ndarray]) -> None:
    """Per-item scores of a run's two checkpoints, compressed (~12 kB a run), written atomically."""
    arrays = {f"best_{k}": v for k, v in best.items()} | {f"final_{k}": v for k, v in final.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save(path, lambda f: np.savez_compressed(f, **arrays))


def images_per_second(work_dir: Path, batch_size: int) -> float | None:
    """Training throughput from the run's log: batch / median logged iteration time."""
    times = []
    for log in work_dir.glob("*.log.json"):
        for line in log.read_text().splitlines():
            entry = json.loads(line)
            if entry.get("mode") == "train" and entry.get("time"):
                times.append(entry["time"])
    return batch_size / statistics.median(times) if times else None


def run_tag(setting: Setting, seed: int, suffix: str) -> str:
    """The run's folder name (under --runs-dir) and the name of its per-item scores."""
    temperature = f"_T{setting.temperature:g}" if setting.temperature is not None else ""
    return f"{setting.head}{temperature}_m{setting.margin:+g}_seed{seed}" + (f"_{suffix}" if suffix else "")


def study_config(args, study: Study, setting: Setting, seed: int) -> Config:
    overrides = [
        *study.overrides,
        f"model.head='{setting.head}'",
        f"model.margin={setting.margin}",
        f"train.seed={seed}",
        f"data.root='{args.data_root}'",
        f"train.precision='{args.precision}'",
        *args.cfg_options,
    ]
    if setting.temperature is not None:
        overrides.append(f"model.temperature={setting.temperature}")
    if setting.margin > 0:
        overrides.append("model.allow_positive_margin=True")
    return replace(load_config(study.config, overrides), name=run_tag(setting, seed, args.tag))


def evaluate_run(cfg: Config, wd: Path, items_path: Path) -> tuple[dict, dict]:
    """Evaluate the best-val and the last checkpoint of a finished run; save their per-item scores."""
    best, best_items = evaluate(cfg, wd / "best_accuracy_mean.pth")
    # The best checkpoint is often the last epoch's: the same weights, evaluated once.
    if best["epoch"] == cfg.train.epochs:
        final, final_items = best, best_items
    else:
        final, final_items = evaluate(cfg, wd / "latest.pth")
    save_items(items_path, best_items, final_items)
    return best, final


def one_run(args, study: Study, setting: Setting, seed: int, runs_dir: Path, out: Path) -> dict:
    cfg = study_config(args, study, setting, seed)
    tag = cfg.name
    wd = runs_dir / tag
    resumed = (wd / "latest.pth").is_file()
    t0 = time.time()
    summary = run(cfg, wd, auto_resume=True, progress=False)
    train_seconds = time.time() - t0
    best, final = evaluate_run(cfg, wd, out / "items" / f"{tag}.npz")
    result = {
        "head": setting.head,
        "margin": setting.margin,
        "seed": seed,
        "precision": args.precision,
        "tag": args.tag,
        "temperature": cfg.model.temperature,
        "base_accuracy": best["base_accuracy"],
        "base_ci95": best["base_ci95"],
        "novel_1shot": best["novel_1shot"],
        "novel_5shot": best["novel_5shot"],
        "best_val_1shot": summary["best_accuracy_mean"],
        "best_epoch": summary["best_epoch"],
        "checkpoint_epoch": best["epoch"],
        "final": final,
        "train_seconds": round(train_seconds, 1),
        "resumed": resumed,  # train_seconds then covers only the part after the interruption
        "images_per_second": images_per_second(wd, cfg.train.batch_size),
        "epochs": cfg.train.epochs,
        "items": f"items/{tag}.npz",
    }
    n1, n5 = result["novel_1shot"], result["novel_5shot"]
    print(
        f"{tag}: best-val checkpoint (epoch {best['epoch']}): base {best['base_accuracy']:.2f}  "
        f"novel 1-shot {n1['mean']:.2f} ± {n1['ci95']:.2f}  5-shot {n5['mean']:.2f} ± {n5['ci95']:.2f}; "
        f"final: base {final['base_accuracy']:.2f} novel 1-shot "
        f"{final['novel_1shot']['mean']:.2f}  ({train_seconds / 60:.1f} min)",
        flush=True,
    )
    return result


def view(r: dict, which: str) -> dict:
    """A run's numbers for the best-val checkpoint ("best") or the last epoch ("final")."""
    if which == "final":
        return r["final"]
    return {k: r[k] for k in ("base_accuracy", "base_ci95", "novel_1shot", "novel_5shot") if k in r}


def ci95(hits: np.ndarray) -> float:
    """95% CI half-width of an accuracy over images (0/100 hits): the test's formula."""
    return float(1.96 * hits.std() / np.sqrt(len(hits)))


def fill_base_ci(results: list[dict], out: Path) -> None:
    """Base-accuracy CIs for runs recorded before the study stored them, from their items."""
    for r in results:
        items = None if "base_ci95" in r else load_items(r, out)
        if items is None:
            continue
        r["base_ci95"] = ci95(items["best_base_hits"])
        r["final"]["base_ci95"] = ci95(items["final_base_hits"])


def matches(r: dict, s: Setting) -> bool:
    return (
        r["head"] == s.head
        and r["margin"] == s.margin
        and (s.temperature is None or r.get("temperature") == s.temperature)
    )


def aggregate(results: list[dict], settings: tuple[Setting, ...]) -> list[dict]:
    rows = []
    for s in settings:
        rs = [r for r in results if matches(r, s)]
        if not rs:
            continue
        speeds = [r["images_per_second"] for r in rs if r.get("images_per_second")]
        row = {
            "setting": s.label,
            "head": s.head,
            "margin": s.margin,
            "temperature": rs[0].get("temperature"),
            "seeds": len(rs),
            "train_minutes": float(np.mean([r["train_seconds"] for r in rs])) / 60,
            "images_per_second": float(np.mean(speeds)) if speeds else None,
            "best_epochs": [r["best_epoch"] for r in rs],
            "best_val_1shot": float(np.mean([r["best_val_1shot"] for r in rs])),
        }
        for which in ("best", "final"):
            vs = [view(r, which) for r in rs]
            for key in ("base_accuracy", "novel_1shot", "novel_5shot"):
                vals = np.array([v[key] if key == "base_accuracy" else v[key]["mean"] for v in vs])
                row[f"{which}_{key}"] = float(vals.mean())
                row[f"{which}_{key}_sd"] = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
                if key != "base_accuracy":
                    row[f"{which}_{key}_ci95"] = float(np.mean([v[key]["ci95"] for v in vs]))
                elif all("base_ci95" in v for v in vs):
                    row[f"{which}_{key}_ci95"] = float(np.mean([v["base_ci95"] for v in vs]))
        rows.append(row)
    return rows


def load_items(r: dict, out: Path) -> dict[str, np.ndarray] | None:
    """A run's per-item scores (``save_items``), or None where they were never kept."""
    path = out / r["items"] if r.get("items") else None
    return dict(np.load(path)) if path and path.is_file() else None


def differences(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, float]:
    """Paired Δ (a − b) and its 95% CI for both checkpoints and the three measures."""
    row = {}
    for which in ("final", "best"):
        for key in ("base_hits", "novel_1shot", "novel_5shot"):
            delta, ci = paired_difference(a[f"{which}_{key}"], b[f"{which}_{key}"])
            name = "base_accuracy" if key == "base_hits" else key
            row[f"{which}_{name}_delta"], row[f"{which}_{name}_ci95"] = delta, ci
    return row


def paired(results: list[dict], out: Path) -> list[dict]:
    """Each run against the cosine m = 0 run of its seed, on the same images and episodes.

    A cosine run is compared with m = 0 at its own temperature, the softmax Baseline
    with m = 0 at the lowest temperature run (the configs' 10). Runs whose per-item
    scores are missing (their checkpoints gone) are left out.
    """
    zeros = [r for r in results if r["head"] == "cosine" and r["margin"] == 0]
    rows = []
    for r in results:
        if r["head"] == "cosine" and r["margin"] == 0:
            continue
        refs = [z for z in zeros if z["seed"] == r["seed"] and z.get("tag") == r.get("tag")]
        if r["head"] == "cosine":
            refs = [z for z in refs if z.get("temperature") == r.get("temperature")]
        refs.sort(key=lambda z: z.get("temperature") or 0)
        a, b = load_items(r, out), (load_items(refs[0], out) if refs else None)
        if a is None or b is None:
            continue
        rows.append(
            {
                "head": r["head"],
                "margin": r["margin"],
                "temperature": r.get("temperature"),
                "seed": r["seed"],
                "reference_temperature": refs[0].get("temperature"),
                **differences(a, b),
            }
        )
    return rows


def between_seeds(results: list[dict], out: Path) -> list[dict]:
    """Each later seed of a setting against its first seed, on the same images and episodes.

    Two trainings of one setting differ only by the seed (initialisation, batch order,
    augmentation), so their paired Δ is the training noise that the paired CI against
    m = 0 leaves out — the yardstick for a margin's effect measured on one seed.
    """
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["head"], r["margin"], r.get("temperature"), r.get("tag")), []).append(r)
    rows = []
    for (head, margin, temperature, _), rs in groups.items():
        first, *later = sorted(rs, key=lambda r: r["seed"])
        b = load_items(first, out)
        for r in later:
            a = load_items(r, out)
            if a is None or b is None:
                continue
            rows.append(
                {
                    "head": head,
                    "margin": margin,
                    "temperature": temperature,
                    "seed": r["seed"],
                    "reference_seed": first["seed"],
                    **differences(a, b),
                }
            )
    return rows


MEASURES = ("base_accuracy", "novel_1shot", "novel_5shot")


def _sorted_by_setting(rows: list[dict], settings: tuple[Setting, ...]) -> list[tuple[str, list[dict]]]:
    """(label, rows) per setting in the study's order, each setting's rows by seed."""
    order = {(s.head, s.margin, s.temperature): i for i, s in enumerate(settings)}
    label = {(s.head, s.margin, s.temperature): s.label for s in settings}

    def key(r: dict) -> tuple:
        k = (r["head"], r["margin"], r["temperature"])
        return k if k in order else (r["head"], r["margin"], None)

    groups: dict[tuple, list[dict]] = {}
    for r in sorted(rows, key=lambda r: (order.get(key(r), 99), r["seed"])):
        groups.setdefault(key(r), []).append(r)
    return [(label.get(k, k[0]), rs) for k, rs in groups.items()]


def _delta_table(caption: str, second_column: str) -> list[str]:
    """Caption and header of a table of Δs: setting, ``second_column``, the three measures."""
    return [
        caption,
        "",
        f"| setting | {second_column} | Δ base classes | Δ novel 1-shot | Δ novel 5-shot |",
        "|---|---|---|---|---|",
    ]


def _delta_cells(r: dict) -> str:
    return " | ".join(f"{r[f'final_{k}_delta']:+.2f} ± {r[f'final_{k}_ci95']:.2f}" for k in MEASURES)


def paired_markdown(rows: list[dict], settings: tuple[Setting, ...]) -> list[str]:
    if not rows:
        return []
    lines = _delta_table(
        "**Paired differences against m = 0** (the same seed; a cosine run against m = 0 at its "
        "temperature, the Baseline against cosine m = 0 at T = "
        f"{rows[0]['reference_temperature']:g}): Δ on the same held-out base images and the same "
        "2000 test episodes. ± is the paired 95% CI: it removes the draw of images and episodes "
        "(an easy episode is easy for both runs), not the training noise — that is what the seeds "
        "measure. Where a setting has several seeds, its last row is their mean Δ with the sd of "
        "the Δs across seeds. Last-epoch checkpoints (best-val checkpoints in the json).",
        "seed",
    )
    for label, rs in _sorted_by_setting(rows, settings):
        lines += [f"| {label} | {r['seed']} | {_delta_cells(r)} |" for r in rs]
        if len(rs) > 1:
            cells = []
            for k in MEASURES:
                ds = np.array([r[f"final_{k}_delta"] for r in rs])
                cells.append(f"**{ds.mean():+.2f}** (sd {ds.std(ddof=1):.2f})")
            lines.append(f"| {label} | mean of {len(rs)} | " + " | ".join(cells) + " |")
    return lines + [""]


def seeds_markdown(rows: list[dict], settings: tuple[Setting, ...]) -> list[str]:
    if not rows:
        return []
    lines = _delta_table(
        "**Between seeds** (a later seed minus the first of the same setting, on the same images "
        "and episodes; ± paired 95% CI): two trainings that differ only by the seed — the training "
        "noise that the paired CIs above leave out.",
        "seeds",
    )
    for label, rs in _sorted_by_setting(rows, settings):
        lines += [f"| {label} | {r['seed']} − {r['reference_seed']} | {_delta_cells(r)} |" for r in rs]
    # If two runs of a setting differ by d = x1 − x0, each has noise sd = rms(d) / √2.
    noise = [float(np.sqrt(np.mean([r[f"final_{k}_delta"] ** 2 for r in rows]) / 2)) for k in MEASURES]
    lines += [
        "",
        f"Training noise of one run (rms of these Δ / √2, {len(rows)} pair{'s' * (len(rows) > 1)}): base classes "
        f"{noise[0]:.2f}, novel 1-shot {noise[1]:.2f}, novel 5-shot {noise[2]:.2f} points (sd).",
        "",
    ]
    return lines


def _cell(row: dict, key: str) -> str:
    text = f"{row[key]:.2f}"
    if f"{key}_ci95" in row:
        text += f" ± {row[key + '_ci95']:.2f}"
    if row["seeds"] > 1:
        text += f" (sd {row[key + '_sd']:.2f})"
    return text


def markdown(
    rows: list[dict],
    study: Study,
    commands: list[str],
    pairs: list[dict] | None = None,
    seed_pairs: list[dict] | None = None,
) -> str:
    lines = []
    for which, title in (
        ("best", "Checkpoint with the best 1-shot val accuracy (the benchmark protocol)"),
        ("final", "Checkpoint after the last epoch"),
    ):
        best = which == "best"
        lines += [
            f"**{title}**",
            "",
            f"| setting | seeds |{' best val 1-shot |' if best else ''} base classes: {study.base_task} | "
            "novel 5-way 1-shot | novel 5-way 5-shot |"
            + (" best epochs | train time | img/s |" if best else ""),
            "|---|---|---|---|---|" + ("---|---|---|---|" if best else ""),
        ]
        for r in rows:
            speed = f"{r['images_per_second']:.0f}" if r.get("images_per_second") else "–"
            val = f" {r['best_val_1shot']:.2f} |" if best else ""
            extra = f" {r['best_epochs']} | {r['train_minutes']:.1f} min | {speed} |" if best else ""
            lines.append(
                f"| {r['setting']} | {r['seeds']} |{val} {_cell(r, which + '_base_accuracy')} | "
                f"{_cell(r, which + '_novel_1shot')} | {_cell(r, which + '_novel_5shot')} |{extra}"
            )
        lines.append("")
    lines += [
        "± is the 95% CI half-width over the 2000 test episodes or the held-out base images (averaged "
        "over seeds); sd is the standard "
        "deviation across seeds; train time per run on this 2-core CPU (a run resumed after an "
        "interruption counts only its last part); img/s from the median logged iteration time.",
        "",
        *paired_markdown(pairs or [], study.settings),
        *seeds_markdown(seed_pairs or [], study.settings),
    ]
    if commands:
        lines += [
            "Commands (one per seed; `--only` gives the settings run at that seed, as numbered by `--list`):",
            "",
            *[f"    {c}" for c in commands],
        ]
    return "\n".join(lines) + "\n"


def _panels(margins: list[float]):
    """(plt, fig, axes) of a three-panel figure, the m > 0 region shaded; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'negmargin[plot]'): no figure", file=sys.stderr)
        return None
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.3))
    if margins and max(margins) > 0:
        for ax in axes:
            ax.axvspan(0, max(margins) * 1.3, color="0.92", label="m > 0: outside Neg-Margin")
    return plt, fig, axes


def _save(plt, fig, axes, title: str, path: Path) -> bool:
    """One legend (first panel, labels once), grid, title; write the png."""
    for ax in axes:
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    axes[0].legend(unique.values(), unique.keys(), fontsize=7, loc="best")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot(groups: list[tuple[str, list[dict]]], study: Study, path: Path, which: str = "final") -> bool:
    """Accuracy against margin: base classes, novel 1-shot, novel 5-shot.

    ``groups`` are (label, rows) of one study each (e.g. T = 10 and T = 30); their
    cosine rows are curves, a softmax row is drawn as a dashed Baseline line.
    Error bars: sd across seeds, or the test's 95% CI for a single seed.
    """
    figure = _panels([r["margin"] for _, rows in groups for r in rows if r["head"] == "cosine"])
    if figure is None:
        return False
    plt, fig, axes = figure
    panels = (
        ("base_accuracy", f"base classes: {study.base_task}"),
        ("novel_1shot", "novel classes: 5-way 1-shot"),
        ("novel_5shot", "novel classes: 5-way 5-shot"),
    )
    for ax, (key, title) in zip(axes, panels):
        ax.axvline(0, color="0.6", lw=0.8)
        full = f"{which}_{key}"
        for k, (label, rows) in enumerate(groups):
            cos = sorted((r for r in rows if r["head"] == "cosine"), key=lambda r: r["margin"])
            if cos:
                err = [r[full + "_sd"] if r["seeds"] > 1 else r.get(full + "_ci95", 0.0) for r in cos]
                seeds = sorted({r["seeds"] for r in cos})
                ax.errorbar(
                    [r["margin"] for r in cos],
                    [r[full] for r in cos],
                    yerr=err,
                    marker="o",
                    color=f"C{k}",
                    capsize=3,
                    label=f"cosine head, {label} ({'/'.join(map(str, seeds))} seed{'s' if seeds[-1] > 1 else ''})",
                )
            for r in rows:
                if r["head"] == "softmax":
                    ax.axhline(
                        r[full],
                        color="C3",
                        ls="--",
                        lw=1.2,
                        label=r["setting"].replace("softmax", "softmax head,"),
                    )
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("margin m  (target logit = T·(cos − m))")
        ax.set_ylabel("accuracy (%)")
    what = "last-epoch checkpoints" if which == "final" else "checkpoints with the best val accuracy"
    title = f"{study.title}, {what}; mean ± sd over seeds (± 95% CI for one seed)"
    return _save(plt, fig, axes, title, path)


def plot_paired(pairs: list[dict], study: Study, path: Path) -> bool:
    """Δ accuracy against m = 0 of the same seed (paired, same images and episodes) per margin.

    One colour per temperature, one marker per seed; error bars are the paired 95% CI.
    The softmax Baseline's Δ (against cosine m = 0) is a dashed line.
    """
    figure = _panels([p["margin"] for p in pairs if p["head"] == "cosine"]) if pairs else None
    if figure is None:
        return False
    plt, fig, axes = figure
    panels = (
        ("base_accuracy", f"Δ base classes ({study.base_task})"),
        ("novel_1shot", "Δ novel classes, 5-way 1-shot"),
        ("novel_5shot", "Δ novel classes, 5-way 5-shot"),
    )
    temps = sorted({p["temperature"] for p in pairs if p["head"] == "cosine"})
    seeds = sorted({p["seed"] for p in pairs})
    for ax, (key, title) in zip(axes, panels):
        ax.axhline(0, color="0.4", lw=0.8)
        for k, t in enumerate(temps):
            for j, seed in enumerate(seeds):
                ps = sorted(
                    (
                        p
                        for p in pairs
                        if p["head"] == "cosine" and p["temperature"] == t and p["seed"] == seed
                    ),
                    key=lambda p: p["margin"],
                )
                if not ps:
                    continue
                shift = (j - (len(seeds) - 1) / 2) * 0.002  # seeds side by side
                # m = 0 is the reference: Δ = 0 by definition, placed in margin order
                pts = sorted(
                    [(0.0, 0.0, 0.0)]
                    + [(p["margin"], p[f"final_{key}_delta"], p[f"final_{key}_ci95"]) for p in ps]
                )
                ax.errorbar(
                    [m + shift for m, _, _ in pts],
                    [d for _, d, _ in pts],
                    yerr=[c for _, _, c in pts],
                    marker="osD^"[j % 4],
                    color=f"C{k}",
                    capsize=3,
                    lw=1,
                    label=f"cosine T={t:g}, seed {seed}",
                )
        for p in (q for q in pairs if q["head"] == "softmax"):
            ax.axhline(
                p[f"final_{key}_delta"],
                color="C3",
                ls="--",
                lw=1.2,
                label=f"softmax Baseline vs cosine T={p['reference_temperature']:g} m=0, seed {p['seed']}",
            )
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("margin m")
        ax.set_ylabel("Δ accuracy vs m = 0 (points)")
    title = (
        f"{study.title}\nlast epoch, each run minus m = 0 of its seed on the same images and "
        "episodes; ± paired 95% CI"
    )
    return _save(plt, fig, axes, title, path)


def by_temperature(rows: list[dict]) -> list[tuple[str, list[dict]]]:
    """Cosine rows grouped by temperature (one curve each); softmax rows ride with the first group."""
    temps = sorted({r["temperature"] for r in rows if r["head"] == "cosine"})
    groups = [
        (f"T={t:g}", [r for r in rows if r["head"] == "cosine" and r["temperature"] == t]) for t in temps
    ]
    softmax = [r for r in rows if r["head"] != "cosine"]
    if groups:
        groups[0] = (groups[0][0], groups[0][1] + softmax)
    return groups or [("", softmax)]


def study_commands(args, study: Study, results: list[dict]) -> list[str]:
    """The commands that reproduce the recorded runs: one per seed, ``--only`` where a seed
    covers part of the grid (built from the results, not from this call's command line)."""
    base = [f"python bench/margin_study.py {args.dataset} --data-root ../shared/data/{args.dataset}"]
    if args.precision != study.precision:
        base += ["--precision", args.precision]
    if args.tag:
        base += ["--tag", shlex.quote(args.tag)]
    # where the data caches live changes no number: a machine's path would only confuse
    options = [o for o in args.cfg_options if not o.startswith("data.cache_dir=")]
    if options:
        base += ["--cfg-options", *map(shlex.quote, options)]
    commands = []
    for seed in sorted({r["seed"] for r in results}):  # one state file holds one tag
        done = [
            i
            for i, s in enumerate(study.settings)
            if any(matches(r, s) and r["seed"] == seed for r in results)
        ]
        line = base + ([f"--seeds {seed}"] if seed != 0 else [])
        if len(done) < len(study.settings):
            line.append("--only " + " ".join(map(str, done)))
        commands.append(" ".join(line))
    return commands


def write_report(args, study: Study, out: Path, results: list[dict]) -> list[dict]:
    fill_base_ci(results, out)
    rows = aggregate(results, study.settings)
    commands = study_commands(args, study, results)
    suffix = f"_{args.tag}" if args.tag else ""
    pairs, seed_pairs = paired(results, out), between_seeds(results, out)
    atomic_write_text(
        out / f"results{suffix}.json",
        json.dumps({"rows": rows, "paired": pairs, "between_seeds": seed_pairs, "runs": results}, indent=1),
    )
    atomic_write_text(out / f"results{suffix}.md", markdown(rows, study, commands, pairs, seed_pairs))
    plot(by_temperature(rows), study, out / f"margin{suffix}.png")
    plot_paired(pairs, study, out / f"paired{suffix}.png")
    if args.combine:
        groups = []
        for tag in args.combine:
            data = json.loads((out / f"results{'_' + tag if tag else ''}.json").read_text())
            groups += by_temperature(data["rows"])
        plot(groups, study, out / "margin_combined.png")
    return rows


def backfill_items(args, study: Study, results: list[dict], runs_dir: Path, out: Path) -> bool:
    """Per-item scores for runs finished before the study saved them, from their checkpoints.

    The re-evaluation must reproduce the stored means (the evaluation is deterministic);
    a run whose numbers differ is reported and left without items.
    """
    changed = False
    for r in results:
        if r.get("tag", "") != args.tag or (r.get("items") and (out / r["items"]).is_file()):
            continue
        setting = next((s for s in study.settings if matches(r, s)), None)
        if setting is None:
            continue
        name = run_tag(setting, r["seed"], args.tag)
        path, wd = out / "items" / f"{name}.npz", runs_dir / name
        if path.is_file():  # saved by a run whose results.json entry an older runner rewrote
            r["items"], changed = f"items/{name}.npz", True
            continue
        if not (wd / "best_accuracy_mean.pth").is_file():
            continue
        cfg = study_config(args, study, setting, r["seed"])
        best, final = evaluate_run(cfg, wd, path)
        stored = [r["base_accuracy"], r["novel_1shot"]["mean"], r["final"]["novel_5shot"]["mean"]]
        again = [best["base_accuracy"], best["novel_1shot"]["mean"], final["novel_5shot"]["mean"]]
        if not np.allclose(stored, again, atol=1e-4):
            print(
                f"{cfg.name}: re-evaluation gives {again}, stored {stored}: items not kept", file=sys.stderr
            )
            path.unlink()
            continue
        print(f"{name}: per-item scores re-computed (means reproduce the stored ones)", flush=True)
        r["items"] = f"items/{name}.npz"
        changed = True
    return changed


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("dataset", choices=sorted(STUDIES))
    parser.add_argument("--data-root", help="the dataset's folder (default ../shared/data/<dataset>)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", help="results folder (default docs/<dataset>)")
    parser.add_argument("--runs-dir", help="run folders with checkpoints (default work_dir/study/<dataset>)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], help="default: the study's")
    parser.add_argument("--tag", default="", help="suffix of the results files and run folders (e.g. bf16)")
    parser.add_argument("--only", type=int, nargs="+", help="subset of the study's settings by index")
    parser.add_argument("--list", action="store_true", help="list the study's settings and exit")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="rewrite the tables and figures from results.json; train nothing",
    )
    parser.add_argument("--cfg-options", nargs="+", default=[])
    parser.add_argument(
        "--combine", nargs="+", help="also plot these studies' results together ('' = untagged)"
    )
    args = parser.parse_args()
    study = STUDIES[args.dataset]
    if args.list:
        for i, s in enumerate(study.settings):
            print(f"{i:>2}  {s.label}")
        return
    args.data_root = args.data_root or str(REPO.parent / "shared" / "data" / args.dataset)
    args.precision = args.precision or study.precision
    if not (Path(args.data_root) / study.marker).exists():
        print(
            f"{args.dataset} not found at {args.data_root} (no {study.marker}; pass --data-root); skipping."
        )
        return
    out = Path(args.out or REPO / "docs" / args.dataset)
    runs_dir = Path(args.runs_dir or REPO / "work_dir" / "study" / args.dataset)
    out.mkdir(parents=True, exist_ok=True)
    suffix = f"_{args.tag}" if args.tag else ""
    state = out / f"results{suffix}.json"
    results = json.loads(state.read_text())["runs"] if state.is_file() else []
    if backfill_items(args, study, results, runs_dir, out) or args.report_only:
        write_report(args, study, out, results)
    if args.report_only:
        return
    chosen = [study.settings[i] for i in args.only] if args.only else list(study.settings)
    for seed in args.seeds:
        for setting in chosen:
            if any(matches(r, setting) and r["seed"] == seed for r in results):
                continue  # finished in an earlier session: its numbers are in results.json
            results.append(one_run(args, study, setting, seed, runs_dir, out))
            write_report(args, study, out, results)  # the committed state after every run
    rows = write_report(args, study, out, results)
    print(markdown(rows, study, []))


if __name__ == "__main__":
    main()
