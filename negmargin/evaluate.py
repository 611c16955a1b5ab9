"""Meta-testing a checkpoint: ``tools/classification/test.py``.

Loads the checkpoint (safely), builds the model the config describes, extracts
the test split's features once (cached on disk by checkpoint content, split and
transform), and meta-tests one or several shot settings with the batched engine.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from . import distributed as dist
from .config import Config
from .datasets import load_split
from .features import cached_features
from .fileio import atomic_write_text
from .meta_test import MetaTestResult, run_meta_test
from .model import load_trained_model
from .runtime import main_first, resolve, start_run


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
    work_dir = Path(work_dir)
    log, show = start_run(cfg, work_dir, progress, log_files=False)
    cfg, rt = resolve(cfg)
    model, ckpt = load_trained_model(cfg, checkpoint_path, rt.device, channels_last=rt.channels_last)
    with main_first():
        packed = load_split(cfg, split, progress=show, log=log.info)
    feats = cached_features(
        model.backbone, packed, cfg, rt, work_dir / "features", progress=show, log=log.info
    )
    results = []
    for n_shot in shots or [cfg.meta_test.n_shot]:
        ev = cfg.meta_test
        if n_shot != ev.n_shot:
            ev = replace(ev, n_shot=n_shot, steps=None)  # the protocol's steps for that shot count
        if steps is not None:
            ev = replace(ev, steps=steps)
        result = run_meta_test(
            feats,
            packed.labels,
            ev,
            cfg.finetune,
            packed.class_names,
            where=f"{split} split",
            progress=show,
            desc=f"meta-test {ev.n_way}-way {n_shot}-shot",
        )
        result = replace(
            result,
            extra={
                "split": split,
                "checkpoint": str(checkpoint_path),
                "config": cfg.name,
                "episode_seed": ev.episode_seed,
                "finetune_seed": cfg.finetune.seed,
                "checkpoint_epoch": ckpt.get("epoch"),
            },
        )
        results.append(result)
        if dist.is_main():
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
