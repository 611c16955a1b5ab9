"""Meta-testing a checkpoint: ``tools/classification/test.py``.

Loads the checkpoint (safely), builds the model the config describes, extracts
the test split's features once (cached on disk by checkpoint content, split and
transform), and meta-tests one or several shot settings with the batched engine.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch

from . import distributed as dist
from .checkpoint import load_checkpoint, load_model_weights
from .config import Config
from .datasets import load_split
from .fileio import atomic_write_text, ensure_writable_dir
from .heads import build_model
from .metatest import MetaTestResult, cached_features, meta_test
from .runlog import RunLog
from .train import resolve_channels_last, resolve_precision


def load_trained_model(
    cfg: Config, checkpoint_path: str | Path, device: torch.device, ckpt: dict | None = None
):
    """The model of ``cfg`` with the checkpoint's weights, in eval mode (``ckpt``: already loaded)."""
    ckpt = load_checkpoint(checkpoint_path) if ckpt is None else ckpt
    num_classes = int(ckpt.get("num_classes") or ckpt["model"]["head.weight"].shape[0])
    model = build_model(cfg, num_classes)
    load_model_weights(model, ckpt, checkpoint_path, cfg.model.backbone)
    model = model.to(device).eval()
    if resolve_channels_last(cfg):
        model = model.to(memory_format=torch.channels_last)
    return model, ckpt


def run_test(
    cfg: Config,
    checkpoint_path: str | Path,
    work_dir: str | Path,
    shots: list[int] | None = None,
    split: str = "test",
    show_task_results: bool = False,
    progress: bool = True,
    steps: int | None = None,
) -> list[MetaTestResult]:
    """Meta-test ``checkpoint_path`` on ``split`` for each shot count; write JSON results.

    Fine-tune steps: ``steps`` if given, else the config's for its own shot count and
    the protocol's rule (150 / 600) for the other shot counts.
    """
    device = dist.local_device(cfg.train.device)
    dist.init(device)
    main = dist.is_main()
    work_dir = Path(work_dir)
    if main:
        ensure_writable_dir(work_dir)
    dist.barrier()
    log = RunLog(None, enabled=main)
    model, ckpt = load_trained_model(cfg, checkpoint_path, device)
    precision, autocast_dtype = resolve_precision(cfg, device)
    if main:
        packed = load_split(cfg, split, progress=progress, log=log.info)
    dist.barrier()
    if not main:
        packed = load_split(cfg, split, progress=False, log=log.info)
    feats = cached_features(
        model.backbone,
        packed,
        cfg,
        device,
        work_dir / "features",
        autocast_dtype,
        precision,
        progress=progress and main,
        log=log.info,
    )
    results = []
    for n_shot in shots or [cfg.meta_test.n_shot]:
        ev = cfg.meta_test
        if n_shot != ev.n_shot:
            ev = replace(ev, n_shot=n_shot, steps=None)  # the protocol's steps for that shot count
        if steps is not None:
            ev = replace(ev, steps=steps)
        result = meta_test(
            feats,
            packed.labels,
            ev,
            cfg.finetune,
            packed.class_names,
            where=f"{split} split",
            progress=progress and main,
            desc=f"meta-test {ev.n_way}-way {n_shot}-shot",
        )
        result.extra = {
            "split": split,
            "checkpoint": str(checkpoint_path),
            "config": cfg.name,
            "episode_seed": ev.episode_seed,
            "finetune_seed": cfg.finetune.seed,
            "checkpoint_epoch": ckpt.get("epoch"),
        }
        results.append(result)
        if main:
            if show_task_results:
                for i, acc in enumerate(result.accuracies):
                    print(f"task {i}: accuracy {acc:.2f}")
            print(result.line())
            print(f"accuracy_mean: {result.mean:.2f}")
            print(f"accuracy_ci95: {result.ci95:.2f}  (95% confidence interval half-width)")
            out = work_dir / f"meta_test_{split}_{ev.n_way}way-{n_shot}shot.json"
            atomic_write_text(out, json.dumps(result.to_dict(with_episodes=True), indent=1))
            print(f"results written to {out}")
    dist.barrier()
    return results
