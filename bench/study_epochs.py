"""The margin's effect as training converges: paired Δ against m = 0 at every saved epoch.

    from study_epochs import write_epochs   # margin_study.py, for studies that score every checkpoint

A study with ``every_checkpoint`` records, for each run, the scores of every saved checkpoint
(``runs[i]["checkpoints"]``: epoch, base fit, novel 1-/5-shot, per-item scores in
``items/<run>_epoch_<N>.npz``). Here each run with m ≠ 0 is set against the m = 0 run of its
seed and temperature, epoch by epoch, on the same images and episodes: the table
``epochs[_tag].md`` and the figure ``epochs[_tag].png`` (Δ novel 1-shot, Δ novel 5-shot and
both runs' base fit against the epoch, one line per temperature and seed). A pure function of the
recorded runs, like ``study_report``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from study_report import Study, _panels, _save

from negmargin.fileio import atomic_write_text
from negmargin.meta_test import paired_difference

MEASURES = (("base_hits", "base"), ("novel_1shot", "novel_1shot"), ("novel_5shot", "novel_5shot"))


def epoch_pairs(results: list[dict], out: Path) -> list[dict]:
    """One row per (run with m ≠ 0, saved epoch that its m = 0 twin also has).

    Row: margin, temperature, seed, epoch, ``base`` / ``base_ref`` (the two runs' base fit) and
    ``<measure>_delta`` / ``<measure>_ci95`` (paired Δ = run − m = 0 and its 95% CI) for
    base fit, novel 1-shot and novel 5-shot. Runs or epochs without per-item scores are left out.
    """
    rows = []
    zeros = [r for r in results if r["margin"] == 0 and r.get("checkpoints")]
    for r in results:
        if r["margin"] == 0 or r["head"] != "cosine" or not r.get("checkpoints"):
            continue
        refs = [
            z for z in zeros
            if z["head"] == "cosine" and z["seed"] == r["seed"] and z.get("temperature") == r.get("temperature")
            and z.get("tag") == r.get("tag")
        ]  # fmt: skip
        if not refs:
            continue
        ref_by_epoch = {c["epoch"]: c for c in refs[0]["checkpoints"]}
        for c in r["checkpoints"]:
            z = ref_by_epoch.get(c["epoch"])
            a, b = (out / "items" / c["items"]), (out / "items" / z["items"]) if z else None
            if b is None or not (a.is_file() and b.is_file()):
                continue
            ia, ib = dict(np.load(a)), dict(np.load(b))
            row = {"margin": r["margin"], "temperature": r.get("temperature"), "seed": r["seed"],
                   "epoch": c["epoch"], "base": c["base_accuracy"], "base_ref": z["base_accuracy"]}  # fmt: skip
            for key, name in MEASURES:
                row[f"{name}_delta"], row[f"{name}_ci95"] = paired_difference(ia[key], ib[key])
            rows.append(row)
    return sorted(rows, key=lambda p: (p["temperature"] or 0, p["margin"], p["seed"], p["epoch"]))


def epochs_markdown(rows: list[dict], study: Study) -> str:
    lines = [
        f"**{study.title}: each run minus m = 0 of its seed and temperature, at every saved epoch**",
        "",
        "| T | m | seed | epoch | base fit, m = 0 | base fit, m | Δ base fit | Δ novel 1-shot | Δ novel 5-shot |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p in rows:
        cells = [f"{p[f'{n}_delta']:+.2f} ± {p[f'{n}_ci95']:.2f}" for _, n in MEASURES]
        lines.append(
            f"| {p['temperature']:g} | {p['margin']:g} | {p['seed']} | {p['epoch']} | {p['base_ref']:.2f} | "
            f"{p['base']:.2f} | " + " | ".join(cells) + " |"
        )
    lines += [
        "",
        f"Base fit: top-1 of the head (no margin) on {study.base_task}. ± is the paired 95% CI over "
        "the same images or the same 2000 test episodes; it leaves out training noise (another seed "
        "gives another model: the between-seed rows of the study's report measure that).",
    ]
    return "\n".join(lines) + "\n"


def plot_epochs(rows: list[dict], study: Study, path: Path) -> bool:
    """Three panels against the epoch: Δ novel 1-shot, Δ novel 5-shot (± paired CI), base fit."""
    figure = _panels([]) if rows else None
    if figure is None:
        return False
    plt, fig, axes = figure
    lines = sorted(
        {(p["temperature"], p["margin"], p["seed"]) for p in rows}, key=lambda k: (k[0] or 0, k[1], k[2])
    )
    for k, (t, m, seed) in enumerate(lines):
        ps = [p for p in rows if (p["temperature"], p["margin"], p["seed"]) == (t, m, seed)]
        shift = (k - (len(lines) - 1) / 2) * 1.0  # lines side by side, an epoch apart
        epochs = [p["epoch"] + shift for p in ps]
        label = f"T={t:g}, m={m:g} vs m=0, seed {seed}"
        for ax, name in zip(axes[:2], ("novel_1shot", "novel_5shot")):
            ax.errorbar(epochs, [p[f"{name}_delta"] for p in ps], yerr=[p[f"{name}_ci95"] for p in ps],
                        marker="os^D"[seed % 4], color=f"C{k}", capsize=3, lw=1, label=label)  # fmt: skip
        axes[2].plot(epochs, [p["base"] for p in ps], marker="o", color=f"C{k}",
                     label=f"T={t:g}, m={m:g}, seed {seed}")  # fmt: skip
        axes[2].plot(epochs, [p["base_ref"] for p in ps], marker="o", ls="--", color=f"C{k}", alpha=0.6,
                     label=f"T={t:g}, m=0, seed {seed} (dashed)")  # fmt: skip
    axes[2].legend(fontsize=7, loc="lower right")
    titles = ("Δ novel 5-way 1-shot", "Δ novel 5-way 5-shot", "base fit (test transform, no margin)")
    for ax, title in zip(axes, titles):
        if ax is not axes[2]:
            ax.axhline(0, color="0.4", lw=0.8)
            ax.set_ylabel("Δ accuracy vs m = 0 (points)")
        else:
            ax.set_ylabel(f"accuracy (%): {study.base_task}", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
    title = f"{study.title}\nthe margin's effect as training converges; ± paired 95% CI"
    return _save(plt, fig, axes, title, path)


def write_epochs(study: Study, out: Path, results: list[dict], suffix: str = "") -> list[dict]:
    """``epochs{suffix}.json`` / ``.md`` / ``.png`` in ``out``; returns the rows."""
    rows = epoch_pairs(results, out)
    if rows:
        atomic_write_text(out / f"epochs{suffix}.json", json.dumps(rows, indent=1))
        atomic_write_text(out / f"epochs{suffix}.md", epochs_markdown(rows, study))
        plot_epochs(rows, study, out / f"epochs{suffix}.png")
    return rows
