"""The margin study's report: statistics, tables and figures from its results.

    from study_report import write_report   # bench/margin_study.py calls it after every run

Everything here is a pure function of the recorded runs (``results.json``'s ``runs``) and
their per-item scores (``items/<run>.npz``: the held-out base images' 0/100 hits and the
2000 test episodes' accuracies of the best-val and the last checkpoint), so a report can
be rebuilt without training (``margin_study.py --report-only``) and tested in-process.
"""

from __future__ import annotations

import json
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from negmargin.fileio import atomic_write_text
from negmargin.meta_test import Z_95, paired_difference


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
    # Base accuracy on images held out from training ("train_holdout", the study's overrides
    # hold them out) or on the training images themselves ("train": how well the model fits).
    base_split: str = "train_holdout"
    # Score every saved checkpoint (``train.checkpoint_interval``), not only the best and last,
    # in the config's runtime (as test.py): the margin's effect as training converges.
    every_checkpoint: bool = False


def view(r: dict, which: str) -> dict:
    """A run's numbers for the best-val checkpoint ("best") or the last epoch ("final")."""
    if which == "final":
        return r["final"]
    return {k: r[k] for k in ("base_accuracy", "base_ci95", "novel_1shot", "novel_5shot") if k in r}


def ci95(hits: np.ndarray) -> float:
    """95% CI half-width of an accuracy over images (0/100 hits): the test's formula."""
    return float(Z_95 * hits.std() / np.sqrt(len(hits)))


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
            "resumed": any(r.get("resumed") for r in rs),
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


# The decision rule of the studies (docs/cub.md §3, docs/omniglot.md): a margin's effect on
# novel 1-shot accuracy, from each seed's Δ against m = 0 of that seed and temperature.
THRESHOLD = 0.5


def verdict(deltas: list[float], base_deltas: list[float]) -> str:
    """``gain`` (mean ≥ +0.5, every seed positive, base accuracy not higher than m = 0's), ``cost``
    (mean ≤ −0.5, every seed negative), or "no effect larger than X" with X = 2 × the sd of the
    seeds' Δs (at least 0.5); one seed is labelled so."""
    d = np.array(deltas)
    one = " (one seed)" if len(d) == 1 else ""
    if d.mean() >= THRESHOLD and (d > 0).all():
        if np.mean(base_deltas) > 0:
            return f"gain on novel, but base accuracy higher too{one}"
        return f"gain{one}"
    if d.mean() <= -THRESHOLD and (d < 0).all():
        return f"cost{one}"
    spread = 2 * d.std(ddof=1) if len(d) > 1 else 0.0
    return f"no effect larger than {max(THRESHOLD, spread):.2f}{one}"


def seed_verdicts(results: list[dict]) -> list[dict]:
    """Per cosine setting with m ≠ 0: each seed's last-epoch Δ novel 1-shot and Δ base accuracy
    against cosine m = 0 of its seed and temperature (differences of the runs' means, so runs
    without per-item scores count too), their mean and sd, and the :func:`verdict`."""
    zeros = {(r["seed"], r.get("temperature"), r.get("tag")): r for r in results
             if r["head"] == "cosine" and r["margin"] == 0}  # fmt: skip
    groups: dict[tuple, list[tuple[float, float]]] = {}
    for r in results:
        z = zeros.get((r["seed"], r.get("temperature"), r.get("tag")))
        if r["head"] != "cosine" or r["margin"] == 0 or z is None:
            continue
        d = r["final"]["novel_1shot"]["mean"] - z["final"]["novel_1shot"]["mean"]
        b = r["final"]["base_accuracy"] - z["final"]["base_accuracy"]
        groups.setdefault((r.get("temperature"), r["margin"]), []).append((d, b))
    rows = []
    for (temperature, margin), pairs in sorted(groups.items(), key=lambda kv: (kv[0][0] or 0, kv[0][1])):
        ds, bs = [p[0] for p in pairs], [p[1] for p in pairs]
        rows.append({"temperature": temperature, "margin": margin, "novel_1shot_deltas": ds, "base_deltas": bs,
                     "mean": float(np.mean(ds)), "sd": float(np.std(ds, ddof=1)) if len(ds) > 1 else None,
                     "verdict": verdict(ds, bs)})  # fmt: skip
    return rows


def verdicts_markdown(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    lines = [
        "**The decision rule** (last epoch; each seed's run minus cosine m = 0 of the same seed and "
        "temperature, differences of means): a *gain* if the mean Δ novel 1-shot is ≥ +0.5 with every "
        "seed positive and base accuracy not higher, a *cost* if ≤ −0.5 with every seed negative, "
        "otherwise no effect larger than 2 × the seeds' sd (at least 0.5).",
        "",
        "| T | m | Δ novel 1-shot per seed | mean (sd) | Δ base per seed | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for v in rows:
        sd = f" (sd {v['sd']:.2f})" if v["sd"] is not None else ""
        per = ", ".join(f"{d:+.2f}" for d in v["novel_1shot_deltas"])
        base = ", ".join(f"{d:+.2f}" for d in v["base_deltas"])
        t = f"{v['temperature']:g}" if v["temperature"] is not None else "config"
        lines.append(f"| {t} | {v['margin']:g} | {per} | {v['mean']:+.2f}{sd} | {base} | {v['verdict']} |")
    return lines + [""]


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
    verdicts: list[dict] | None = None,
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
            minutes = f"{r['train_minutes']:.1f} min" + (" (resumed)" if r.get("resumed") else "")
            extra = f" {r['best_epochs']} | {minutes} | {speed} |" if best else ""
            lines.append(
                f"| {r['setting']} | {r['seeds']} |{val} {_cell(r, which + '_base_accuracy')} | "
                f"{_cell(r, which + '_novel_1shot')} | {_cell(r, which + '_novel_5shot')} |{extra}"
            )
        lines.append("")
    lines += [
        "± is the 95% CI half-width over the 2000 test episodes or the held-out base images (averaged "
        "over seeds); sd is the standard "
        "deviation across seeds; train time per run on this 2-core CPU (a run marked resumed "
        "counts only the part after its last interruption: 0 for a finished run scored again); img/s from the median logged iteration time.",
        "",
        *paired_markdown(pairs or [], study.settings),
        *seeds_markdown(seed_pairs or [], study.settings),
        *verdicts_markdown(verdicts or []),
    ]
    if commands:
        lines += [
            "Commands (one per seed; `--only` gives the settings run at that seed, as numbered by `--list`; `DATA` is the folder that holds the datasets):",
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
    # DATA: the folder that holds the datasets (a machine's own path would only confuse)
    base = [f"python bench/margin_study.py {args.dataset} --data-root DATA/{args.dataset}"]
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
    rows = aggregate(results, study.settings)
    commands = study_commands(args, study, results)
    suffix = f"_{args.tag}" if args.tag else ""
    pairs, seed_pairs, verdicts = paired(results, out), between_seeds(results, out), seed_verdicts(results)
    state = {
        "rows": rows,
        "paired": pairs,
        "between_seeds": seed_pairs,
        "verdicts": verdicts,
        "runs": results,
    }
    atomic_write_text(out / f"results{suffix}.json", json.dumps(state, indent=1))
    atomic_write_text(
        out / f"results{suffix}.md", markdown(rows, study, commands, pairs, seed_pairs, verdicts)
    )
    plot(by_temperature(rows), study, out / f"margin{suffix}.png")
    plot_paired(pairs, study, out / f"paired{suffix}.png")
    if args.combine:
        groups = []
        for tag in args.combine:
            data = json.loads((out / f"results{'_' + tag if tag else ''}.json").read_text())
            groups += by_temperature(data["rows"])
        plot(groups, study, out / "margin_combined.png")
    return rows
