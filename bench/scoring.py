"""What a checkpoint has learned, scored the same way for every run that is compared.

    from scoring import score_checkpoint, score_run

The training log's accuracy is a running mean over augmented, margin-shifted batches and its
val line is 100 episodes; neither says how well a model fits its base classes, nor picks
reliably among checkpoints within noise of each other. Each checkpoint gets here:

* ``base``: top-1 of its trained head, **no margin**, on a base-class split's images with the
  **test transform** — the training images (``"train"``: how well it fits them) or images held
  out from training (``"train_holdout"``: how well it generalises on its base task);
* ``val_1shot`` (optional): many 5-way 1-shot episodes on the val classes, drawn with a seed
  other than the one training selected its best epoch on, so the score of the selected
  checkpoint is not inflated by the selection;
* ``novel_1shot`` / ``novel_5shot``: the benchmark's 2000 test episodes.

Per-item scores (0/100 per base image, accuracy per episode) are returned with the summary: the
same images and episodes for every run, so two runs compare paired (``study_report``). Used by
``margin_study.py`` (best and last checkpoint of every run, or every saved one) and
``score_checkpoints.py`` (the saved checkpoints of any run).
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from study_report import ci95

from negmargin.config import Config
from negmargin.datasets import load_split
from negmargin.features import extract_features
from negmargin.fileio import atomic_save, atomic_write_text, file_sha256
from negmargin.meta_test import run_meta_test
from negmargin.model import FewShotModel, load_trained_model
from negmargin.runtime import Runtime

# The val episodes of the scores: another seed than training's (``cfg.val.episode_seed``), so
# that the epoch training picked on its 100 episodes is scored on episodes it was not picked on.
VAL_SEED_OFFSET = 1


def base_hits(model: FewShotModel, feats: torch.Tensor, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(N,) 0/100: whether the head's most similar base class (no margin) is the image's label.

    ``feats`` (N, D) are the images' backbone features; columns beyond ``num_classes`` (head
    rows that never had a label, e.g. miniImageNet's 100-row head) are left out.
    """
    with torch.no_grad():
        pred = model.head.similarity(feats)[:, :num_classes].argmax(1).cpu().numpy()
    return (pred == labels).astype(np.float32) * 100


def score_checkpoint(
    cfg: Config,
    checkpoint: Path,
    rt: Runtime,
    base_split: str = "train_holdout",
    val_episodes: int = 0,
    shots: tuple[int, ...] = (1, 5),
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Scores of one checkpoint (see the module) and the per-item scores behind them.

    Returns ``({"epoch", "base_accuracy", "base_ci95", ["val_1shot"], "novel_<k>shot"...},
    {"base_hits": (n_images,), ["val_1shot": (val_episodes,)], "novel_<k>shot": (2000,)})``.
    """
    model, ckpt = load_trained_model(cfg, checkpoint, rt.device, channels_last=rt.channels_last)
    quiet = {"progress": False, "log": lambda m: None}
    base = load_split(cfg, base_split, **quiet)
    hits = base_hits(model, extract_features(model.backbone, base, cfg, rt, progress=False), base.labels,
                     base.num_classes)  # fmt: skip
    out: dict[str, Any] = {
        "epoch": ckpt.get("epoch"),
        "base_accuracy": float(hits.mean()),
        "base_ci95": ci95(hits),
    }
    items = {"base_hits": hits}
    if val_episodes:
        val = load_split(cfg, "val", **quiet)
        ev = replace(
            cfg.val, n_shot=1, n_episodes=val_episodes, episode_seed=cfg.val.episode_seed + VAL_SEED_OFFSET
        )
        feats = extract_features(model.backbone, val, cfg, rt, progress=False)
        r = run_meta_test(
            feats, val.labels, ev, cfg.finetune, val.class_names, where="val split", progress=False
        )
        out["val_1shot"] = {"mean": r.mean, "ci95": r.ci95, "episodes": val_episodes}
        items["val_1shot"] = r.accuracies.astype(np.float32)
    test = load_split(cfg, "test", **quiet)
    feats = extract_features(model.backbone, test, cfg, rt, progress=False)
    for shot in shots:
        ev = replace(cfg.meta_test, n_shot=shot, steps=None)  # the protocol's 150 / 600 steps
        r = run_meta_test(
            feats, test.labels, ev, cfg.finetune, test.class_names, where="test split", progress=False
        )
        out[f"novel_{shot}shot"] = {"mean": r.mean, "ci95": r.ci95}
        items[f"novel_{shot}shot"] = r.accuracies.astype(np.float32)
    return out, items


def saved_checkpoints(work_dir: Path) -> list[Path]:
    """A run's ``epoch_<N>.pth`` in epoch order, then ``best_accuracy_mean.pth`` if present."""
    numbered = sorted(work_dir.glob("epoch_*.pth"), key=lambda p: int(re.sub(r"\D", "", p.stem) or 0))
    best = work_dir / "best_accuracy_mean.pth"
    return numbered + ([best] if best.is_file() else [])


def score_run(
    cfg: Config,
    work_dir: Path,
    state_path: Path,
    items_dir: Path,
    rt: Runtime,
    base_split: str,
    val_episodes: int = 0,
    log=print,
) -> list[dict[str, Any]]:
    """Score every saved checkpoint of a run; resumable.

    ``state_path`` (JSON) holds one entry per checkpoint file with its content's sha256, written
    after each one, so a checkpoint already scored with the same settings (or a copy of one, as
    ``best_accuracy_mean.pth`` is of an epoch's) is not scored again and an interrupted call goes
    on where it stopped. Per-item scores go to
    ``items_dir/<run>_<checkpoint stem>.npz``. Returns the entries in epoch order.
    """
    settings = {"base_split": base_split, "val_episodes": val_episodes, "precision": rt.precision,
                "channels_last": rt.channels_last}  # fmt: skip
    state = (
        json.loads(state_path.read_text()) if state_path.is_file() else {"run": cfg.name, "checkpoints": []}
    )
    done = {e["sha256"]: e for e in state["checkpoints"] if e.get("settings") == settings}
    entries = []
    for path in saved_checkpoints(work_dir):
        digest = file_sha256(path)
        if digest in done:  # scored before, or a copy of one scored (best = epoch N)
            entry = done[digest] | {"file": path.name}
        else:
            summary, items = score_checkpoint(cfg, path, rt, base_split, val_episodes)
            name = f"{cfg.name}_{path.stem}.npz"
            items_dir.mkdir(parents=True, exist_ok=True)
            atomic_save(items_dir / name, lambda f, items=items: np.savez_compressed(f, **items))
            entry = {"file": path.name, "sha256": digest, "settings": settings, **summary, "items": name}
            done[digest] = entry
            log(line(entry))
        entries.append(entry)
        state["checkpoints"] = [e for e in state["checkpoints"] if e["file"] != path.name] + [entry]
        state_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(state_path, json.dumps(state, indent=1))
    return sorted(entries, key=lambda e: (e["file"] == "best_accuracy_mean.pth", e["epoch"] or 0))


def line(e: dict[str, Any]) -> str:
    """One checkpoint's scores on one line."""
    val = (
        f"  val 1-shot ({e['val_1shot']['episodes']} ep.) {e['val_1shot']['mean']:.2f}"
        if "val_1shot" in e
        else ""
    )
    novel = "  ".join(
        f"novel {k[6:]} {e[k]['mean']:.2f} ± {e[k]['ci95']:.2f}" for k in e if k.startswith("novel_")
    )
    return f"{e['file']} (epoch {e['epoch']}): base {e['base_accuracy']:.2f}{val}  {novel}"
